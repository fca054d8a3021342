"""Everything between the engine and the flows: I/O, validation, tracking, review, grouped by what it does.

* :mod:`tasks.options`: every option, declared once (the CLI's flags, the flow's parameters, the engine spec and
  the factor settings are built from it);
* :mod:`tasks.inputs`: training sources, rows, shards, the preflight and the input checks (Great Expectations);
* :mod:`tasks.influence`: fit and score, candidates, prefilter, gradient index, verification, evaluation, the
  audit report;
* :mod:`tasks.quality`: the query-free data-quality audit;
* :mod:`tasks.record`: MLflow (the one module that imports it is :mod:`tasks.record.tracker`), the audit's manifest
  and run, traces, sync;
* :mod:`tasks.review`: human review (decisions, pulling marks from MLflow, the Prefect form);
* :mod:`tasks.ops`: the ``model.retrained`` event, the MLflow webhook receiver, model URIs.

Plain functions first; the Prefect tasks are thin wrappers in each group's ``stages`` module.
"""
