import logging
import os

import pytest
import torch

os.environ.setdefault("MMBALANCE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))

# Tiny models: one thread is as fast as two and avoids thread over-subscription when several
# test processes share the machine.
torch.set_num_threads(1)


@pytest.fixture
def warnings_of_mmbalance():
    """Records (WARNING and above) of the 'mmbalance' logger during the test: the CLI turns the
    logger's propagation off, so pytest's caplog does not always see them."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("mmbalance")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
