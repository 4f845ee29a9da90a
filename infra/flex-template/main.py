"""The Flex Template launcher's program (FLEX_TEMPLATE_PYTHON_PY_FILE): ``corpus-etl $CORPUS_ETL_COMMAND``
with the launch's parameters; see pipelines/flex_template.py."""

import sys

from pipelines.flex_template import main

if __name__ == "__main__":
    sys.exit(main())
