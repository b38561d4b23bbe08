"""aha.cluster"""
