"""Beam's own Python job service, with ``--direct_num_workers`` SDK workers per job.

    python -m tests.portable_job_service --port_file FILE

The job service is the portable path that Flink and Dataflow Runner v2 share: the driver
(``--runner PortableRunner --job_endpoint localhost:PORT``) sends the pipeline as a Runner
API proto, the service runs it (Beam's ``FnApiRunner``) and asks the SDK worker pool named
by ``--environment_type EXTERNAL --environment_config localhost:POOL_PORT`` to start the
workers, which import the project. Beam 2.77's ``local_job_service_main`` runs every job on
one worker (``run_via_runner_api`` never reads ``direct_num_workers``); this is the same
``LocalJobServicer`` with a ``BeamJob`` that takes the worker count from the job's options,
so the tests see two SDK worker processes, as on a cluster (and ``--direct_runner_bundle_repeat``,
which replays every bundle, as DirectRunner does).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner


class BeamJobWithWorkers(local_job_service.BeamJob):
    def _invoke_runner(self):
        self.set_state(beam_job_api_pb2.JobState.RUNNING)
        options = self.pipeline_options()
        direct = options.view_as(DirectOptions)  # values come through the job API as strings
        runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
        runner._num_workers = max(1, int(direct.direct_num_workers or 1))
        runner._bundle_repeat = int(direct.direct_runner_bundle_repeat or 0)
        return runner.run_via_runner_api(self._pipeline_proto, options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port_file", required=True, help="written (atomically) once the service listens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    servicer = local_job_service.LocalJobServicer(beam_job_type=BeamJobWithWorkers)
    port = servicer.start_grpc_server(args.port)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.replace(args.port_file + ".tmp", args.port_file)
    try:
        while True:
            time.sleep(3600)
    finally:
        servicer.stop()


if __name__ == "__main__":
    main()
