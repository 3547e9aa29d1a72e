"""Multi-process stress suite for loopstore: `python -m stress` (see README "Stress suite")."""
