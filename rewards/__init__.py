"""aha.rewards"""
