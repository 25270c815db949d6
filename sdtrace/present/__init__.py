"""The presentation layer: what records become for people and programs.

aggregate (counts, histograms, latencies from records), output (tables,
event lines, JSON), report (aggregation results as text), perfetto
(timelines).  Reads the engine's records; never arms anything.
"""
