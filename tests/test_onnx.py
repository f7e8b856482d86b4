"""ONNX export and the onnxruntime backend: same codes and audio as PyTorch through the same engine."""

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from audiogen import (AudioGen, CheckpointError, Engine, GenerationRequest, InvalidConfigError,  # noqa: E402
                      MissingCheckpointFileError, SamplingParams)
from audiogen.cli import main  # noqa: E402
from audiogen.kv_cache import KVCache  # noqa: E402
from audiogen.onnx.runtime import REQUIRED_FILES  # noqa: E402

GRAPHS = ("text_encoder.onnx", "lm_step.onnx", "audio_decoder.onnx")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny):
    """The `tiny` fixture model, saved and exported by the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    tiny.save_pretrained(root / "model")
    assert main(["export-onnx", str(root / "model"), str(root / "tiny")]) == 0
    return root / "tiny"


@pytest.fixture(scope="module")
def onnx_model(onnx_dir):
    model = AudioGen.from_onnx(onnx_dir)
    yield model
    model.close()


def _requests(**sampling):
    """Several prompts and durations: within one window, beyond the tiny model's 2 s window (sliding-window
    extension with prefill), an empty prompt (null condition) and a negative prompt."""
    common = SamplingParams(**sampling)
    return [GenerationRequest(prompt="a dog barking", duration=0.3, sampling=common),
            GenerationRequest(prompt="rain on a tin roof", duration=1.5,
                              sampling=SamplingParams(negative_prompt="thunder", **sampling)),
            GenerationRequest(prompt="", duration=0.5, sampling=common),
            GenerationRequest(prompt="a siren rising and falling in the distance", duration=4.4, sampling=common)]


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.codes, b.codes), (a.request.prompt, (a.codes != b.codes).sum().item())
        assert a.audio.shape == b.audio.shape
        assert np.abs(a.audio - b.audio).max() < 1e-4


def test_export_writes_valid_files(onnx_dir, tiny):
    import onnx

    assert {p.name for p in onnx_dir.iterdir()} >= set(REQUIRED_FILES)
    for name in GRAPHS:
        onnx.checker.check_model(str(onnx_dir / name), full_check=True)
    step = onnx.load(str(onnx_dir / "lm_step.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in step.graph.input}
    c = tiny.config
    assert dims["tokens"] == ["rows", c.num_codebooks, "steps"]
    assert dims["past_keys"] == [c.num_layers, "rows", c.num_heads, "past", c.head_dim]
    assert dims["cross_mask"] == ["rows", "text_tokens"]
    meta = json.loads((onnx_dir / "audiogen_onnx.json").read_text())
    assert meta["config"] == c.to_dict() and meta["opset"] >= 17
    assert meta["codec"]["hop_length"] == 320 and meta["source_checksum"] == tiny.checksum()


def test_greedy_codes_and_audio_match_torch(onnx_model, tiny):
    _assert_same(onnx_model.run(_requests(temperature=0.0, seed=0)), tiny.run(_requests(temperature=0.0, seed=0)))


def test_step_graph_gives_the_torch_steps_logits_and_cache(onnx_model, tiny):
    """lm_step.onnx (traced from `LanguageModel.run`) driven by the ONNX backend's prefill and step: the same
    logits and cache contents as `LanguageModel.prefill`/`step`, rows at different positions, one null text."""
    c = tiny.config
    prompts = ["a dog barking", "rain", "", "wind howling through trees"]
    tokens = torch.randint(0, c.card + 1, (4, c.num_codebooks, 9), generator=torch.Generator().manual_seed(0))
    starts = torch.tensor([4, 4, 2, 2])
    results = []
    for model in (tiny, onnx_model):
        cache = KVCache(num_layers=c.num_layers, rows=4, num_heads=c.num_heads, head_dim=c.head_dim,
                        max_steps=c.max_steps, text_tokens=c.max_text_tokens, device="cpu", dtype=torch.float32)
        with torch.inference_mode():
            text, mask = model.text(prompts)
            cache.store_text(slice(0, 4), model.lm.project_text(text), mask)
            model.lm.prefill(tokens[:2, :, :4], cache, slice(0, 2))
            model.lm.prefill(tokens[2:, :, :2], cache, slice(2, 4))
            positions = [starts + t for t in range(5)]
            logits = [model.lm.step(tokens[torch.arange(4), :, pos], pos, cache, 4, int(pos.max()) + 1)
                      for pos in positions]
        results.append((torch.stack(logits), cache.keys[:, :, :, :9].clone(), cache.values[:, :, :, :9].clone()))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_continuation_and_inpainting_match_torch(onnx_model, tiny):
    prefix = tiny.run([GenerationRequest(prompt="wind", duration=2.6, sampling=SamplingParams(seed=5))])[0].codes
    known = prefix[:, :60].clone()
    mask = torch.zeros(60, dtype=torch.bool)
    mask[20:35] = True

    def requests():
        # A prefix longer than the 100-frame window: the first window starts late and is prefilled.
        return [GenerationRequest(prompt="wind", duration=3.6, prefix_codes=prefix[:, :120],
                                  sampling=SamplingParams(temperature=0.0)),
                GenerationRequest(prompt="wind", duration=1.0, prefix_codes=prefix[:, :30],
                                  sampling=SamplingParams(temperature=0.0)),
                GenerationRequest(prompt="knock", inpaint_codes=known, inpaint_mask=mask,
                                  sampling=SamplingParams(temperature=0.0))]

    _assert_same(onnx_model.run(requests()), tiny.run(requests()))


def test_seeded_sampling_matches_torch(onnx_model, tiny):
    # Logits differ from PyTorch's by float32 rounding only (~1e-6), far below the Gumbel noise's resolution
    # at the sampled boundaries: every sampled token is observed to be the same.
    _assert_same(onnx_model.run(_requests(seed=11)), tiny.run(_requests(seed=11)))
    clips = onnx_model.generate(["door knock", "birds"], duration=0.4, seed=3, top_k=4, top_p=0.9)
    assert np.abs(clips[1] - tiny.generate(["door knock", "birds"], duration=0.4, seed=3, top_k=4,
                                           top_p=0.9)[1]).max() < 1e-4


def test_streaming_through_the_engine(onnx_model):
    request = GenerationRequest(prompt="footsteps", duration=1.2, sampling=SamplingParams(seed=2))
    whole = onnx_model.run([request])[0].audio

    async def collect():
        return [chunk async for chunk in onnx_model.engine.stream(request)]

    chunks = asyncio.run(collect())
    assert len(chunks) > 1
    streamed = np.concatenate(chunks, axis=-1)
    assert streamed.shape == whole.shape and np.abs(streamed - whole).max() < 1e-2


def test_metadata_and_limits(onnx_model, tiny):
    meta = onnx_model.metadata()
    assert meta["backend"] == "onnx" and tiny.metadata()["backend"] == "torch"
    assert meta["parameters"] == tiny.metadata()["parameters"] and len(meta["checksum"]) == 64
    with pytest.raises(NotImplementedError, match="no audio encoder"):
        onnx_model.continue_audio(np.zeros(3200, dtype=np.float32), 16000, extension_seconds=0.5)
    with pytest.raises(ValueError, match="dtype"):
        onnx_model.to(lm_dtype=torch.bfloat16)
    with pytest.raises(InvalidConfigError, match="compile"):
        Engine(onnx_model, compile=True)
    with pytest.raises(ValueError, match="codes"):
        onnx_model.decode(torch.full((4, 3), 64))


@pytest.mark.parametrize("name", sorted(REQUIRED_FILES))
def test_incomplete_directory_names_the_missing_file(onnx_dir, tmp_path, name):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / name).unlink()
    with pytest.raises(MissingCheckpointFileError, match=name.replace(".", r"\.")):
        AudioGen.from_onnx(broken)


def test_corrupt_or_wrong_files_are_rejected(onnx_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / "lm_step.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError, match=r"lm_step\.onnx"):
        AudioGen.from_onnx(broken)
    shutil.copy(onnx_dir / "audio_decoder.onnx", broken / "lm_step.onnx")  # valid ONNX, wrong graph
    with pytest.raises(CheckpointError, match=r"lm_step\.onnx in .* has inputs \['codes'\]"):
        AudioGen.from_onnx(broken)
    (broken / "audiogen_onnx.json").write_text("{")
    with pytest.raises(CheckpointError, match="audiogen_onnx.json"):
        AudioGen.from_onnx(broken)
    with pytest.raises(MissingCheckpointFileError, match="does not exist"):
        AudioGen.from_onnx(tmp_path / "nowhere")


def test_cli_generate_with_onnx_backend(onnx_dir, tmp_path, capsys):
    import soundfile as sf

    base = ["generate", "a dog barking", "--duration", "0.5", "--seed", "4", "--temperature", "0"]
    assert main(base + ["-o", str(tmp_path / "onnx.wav"), "--model", str(onnx_dir), "--backend", "onnx"]) == 0
    assert main(base + ["-o", str(tmp_path / "torch.wav"), "--model", str(onnx_dir.parent / "model"),
                        "--backend", "torch"]) == 0
    a, _ = sf.read(tmp_path / "onnx.wav", dtype="float32")
    b, _ = sf.read(tmp_path / "torch.wav", dtype="float32")
    assert a.shape == b.shape and np.abs(a - b).max() <= 2 / 32768  # PCM16 files: at most a rounding step
    assert main(["generate", "x", "-o", str(tmp_path / "x.wav"), "--backend", "onnx"]) == 2
    assert "onnx needs --model" in capsys.readouterr().err


def test_stereo_export_matches_torch(tmp_path):
    from audiogen.onnx import export_onnx
    from audiogen.scratch import random_model as tiny_model

    model = tiny_model(seed=1, audio_channels=2)
    try:
        export_onnx(model, tmp_path / "stereo")
        onnx_model = AudioGen.from_onnx(tmp_path / "stereo")
        try:
            requests = [GenerationRequest(prompt="stereo rain", duration=0.6, sampling=SamplingParams(temperature=0.0))]
            ours, theirs = onnx_model.run(requests)[0], model.run(requests)[0]
            assert ours.audio.shape == (2, 30 * 320)
            assert torch.equal(ours.codes, theirs.codes) and np.abs(ours.audio - theirs.audio).max() < 1e-4
        finally:
            onnx_model.close()
    finally:
        model.close()
