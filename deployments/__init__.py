"""Deployment definitions (schedules, triggers, work pools), kept apart from the flows they run."""
