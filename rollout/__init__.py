"""aha.rollout"""
