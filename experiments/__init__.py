"""The evidence harness: the study (methods x ranks x seeds, rates chosen on validation) and the budget sweep,
with their reports. A consumer of the lsq engine (``lsq.steps``), outside the library: changing it never
re-keys a finished step."""
