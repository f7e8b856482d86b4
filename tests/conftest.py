import os

import pytest
import torch

# Tests never touch the network: transformers/huggingface_hub must resolve everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    """The deterministic tiny model (shared: tests must not mutate it)."""
    from audiogen.scratch import random_model as tiny_model

    model = tiny_model(seed=0)
    yield model
    model.close()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random transformers MusicGen saved with save_pretrained, and the in-memory original."""
    from tests.hf_fixture import save_tiny_hf_musicgen

    directory, model = save_tiny_hf_musicgen(tmp_path_factory.mktemp("hf_musicgen"), seed=0)
    return directory, model


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A local moto S3 server on 127.0.0.1 (what s3fs's own tests do); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server: (bucket name, fsspec storage_options)."""
    import re

    import boto3

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_server,
               "client_kwargs": {"region_name": "us-east-1"}}
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{_free_port()}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name, options


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, sized like CI (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": always a fresh instance of our own, never a cluster another process left registered
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
