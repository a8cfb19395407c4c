"""Prometheus metrics: what each worker measures (``stages``), how an endpoint serves them
(``http``), the farm-wide view ``farm metrics`` exports (``farm_wide``), and the files a
prefork worker's children count in (``multiproc``).

Conventions are prometheus-client's: base units, ``_total`` counters, ``_seconds``
histograms, and labels of low cardinality: pipeline, stage (the stage *function*, so a DAG's
64 tiles are one stage ``tile``), queue, outcome. Never a job id.
"""
