"""Feedback from live users: thumbs, Likert, pairwise choices and rankings, nothing lost or forged."""
