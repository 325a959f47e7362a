"""Flex Template entry point: the launcher runs this file with the template's parameters as flags.

The same image is the workers' SDK container (`sdk_container_image`), so the workers run the
tripletflow installed in it: no package staging at launch. Thin: `tripletflow run` does the work.
"""

from __future__ import annotations

import logging
import sys

from pipelines import embedding_stats

if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)  # the launcher forwards the log to the job's page
    # The launcher stops once the job is created: never wait, the job commits its output itself.
    sys.exit(embedding_stats.run(["--no-wait", *sys.argv[1:]]))
