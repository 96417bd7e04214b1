"""The commands: one module per ``automl-compress`` subcommand.

Each turns the parsed arguments into library calls (automl_compress/pipeline.py,
automl_compress/agents/run.py, automl_compress/roundtrip.py, automl_compress/report.py), prints
what it did and reads or writes the run directory (:mod:`automl_compress.commands.rundir`).
Every ``run`` returns the exit code; the library's named errors propagate to
:func:`automl_compress.cli.main`, which prints them and exits with code 2.

- ``build_db``: ``build-db``; ``compress``: ``compress``; ``evaluate``: ``evaluate RUN``;
  ``export``: ``export RUN``; ``train``: ``train``; ``apply``: ``apply``; ``report``:
  ``report RUN...``; ``info``: ``info``.
"""
