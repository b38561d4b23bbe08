"""aha.learner"""
