"""`corpus-etl index` as a Beam pipeline file, for Airflow's BeamRunPythonPipelineOperator (py_file).

The operator runs ``python index_job.py --key=value ...`` with its pipeline_options: the flags of
``corpus-etl index`` (keys spelled as the CLI spells them, ``qdrant-url``) and Beam's options alike.
The command waits for the job, then switches the alias; its exit status is the task's: 0 ok,
3 partial or alias switch refused, 1 failed, 2 refused before anything was written.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
