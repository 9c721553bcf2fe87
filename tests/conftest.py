import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Unit tests use tiny tensors: extra intra-op threads only add synchronisation on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory):
    """The whole pipeline at smoke scale, run once per session in a temporary git copy (tests/pipeline_repo.py)."""
    from pipeline_repo import copy_repo, make_reproduce

    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    proc = make_reproduce(repo)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return repo
