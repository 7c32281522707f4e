"""RAHF training: preference modelling, activity patterns, representation alignment."""
