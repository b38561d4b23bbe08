"""aha.actors"""
