"""Train the project's small demo model end to end with the project's own pipelines: one reproducible recipe.

    python jobs/demo_model.py WORK                      # the full demo model: about 1 h on 2 idle CPU cores
    python jobs/demo_model.py WORK --use-gpu            # the LM stage (and encoding, generation) on a GPU
    python jobs/demo_model.py WORK --ship audiogen/weights/demo   # then embed it as the package's default model

Stages, in order; each is skipped when its output exists, so rerunning the same command after a crash resumes
(the train stage also resumes its Ray Train run from the latest checkpoint). `--stages` runs a subset; delete a
stage's output to redo it (and the stages after it, which were built from it).

    corpus    WORK/corpus/{train,heldout}/*.wav + {train,heldout}.jsonl: the seeded procedural corpus of
              `audiogen.data.synth` (held-out captions, parameter combinations and value ranges never seen in
              training).
    codec     WORK/codec/: an EnCodec trained on the train clips (`audiogen.codec_training`), with
              codec_report.json (training history, held-out round-trip SI-SNR).
    base      WORK/base/: the model directory a from-scratch run is conditioned on: the tiny random T5 (frozen in
              training) with the word-level tokenizer of `audiogen.scratch` at width --text-dim, the trained codec,
              and the demo LM config (the `tiny` preset + `lm_overrides`) with its step-0 weights.
    encode    WORK/codes/{train,heldout}/: `pipelines.encode` with the base's codec, one segment per clip.
    train     WORK/runs/ (Ray Train checkpoints), WORK/model/ (the exported model, best held-out loss) and
              WORK/train_summary.json: `pipelines.train` from scratch, the held-out codes as validation set.
    evaluate  WORK/eval.json, WORK/samples/*.wav and WORK/model/MODEL_CARD.md: generate every held-out caption
              with several seeds and measure what the caption promises (`audiogen.eval.caption_checks`).

The same model from the CLI (what the encode and train stages call):

    audiogen encode WORK/corpus/train.jsonl WORK/codes/train --codec WORK/base --segment-seconds 5
    audiogen train WORK/codes/train --val-data WORK/codes/heldout --storage WORK/runs --name demo \\
        --preset tiny --base WORK/base --override name=audiogen-demo --override dim=256 ... --export WORK/model

A micro run of every stage (what tests/test_demo_recipe.py runs):

    python jobs/demo_model.py /tmp/demo --train-clips 16 --heldout-clips 4 --clip-seconds 1 --codec-steps 20 \\
        --codec-batch 4 --codec-filters 4 --codec-hidden 16 --codec-card 32 --text-dim 16 --dim 32 --layers 1 \\
        --heads 2 --steps 10 --batch-size 4 --eval-every 5 --eval-seeds 1

The codec always trains on the CPU (`train_codec` has no device option); `--use-gpu` moves the LM training (one
GPU per worker), the encoder actor and the evaluation's generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESET = "tiny"  # the LM preset the demo sizes override (`audiogen train --preset`)
RUN_NAME = "demo"  # the Ray Train run in WORK/runs
MAX_TEXT_TOKENS = 64  # synth captions need <= 27 tokens; room for users' own prompts
TOP_K = 50  # sampling default of the demo model (of a 256-code card)


# ---------------------------------------------------------------------------------------------------------------
# Layout of the work directory
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    def manifest(self, split: str) -> Path:
        return self.corpus / f"{split}.jsonl"

    @property
    def codec(self) -> Path:
        return self.root / "codec"

    @property
    def codec_report(self) -> Path:
        return self.codec / "codec_report.json"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def codes(self, split: str) -> Path:
        return self.root / "codes" / split

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def write_json(path: Path, data: Any) -> None:
    """Atomically (temp file + rename), so a crash never leaves a half-written file that marks a stage done."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------
def codec_options(args: argparse.Namespace) -> dict[str, Any]:
    """`build_encodec` sizes on top of `DEMO_CODEC` (16 kHz, 50 Hz, 4 codebooks)."""
    return dict(card=args.codec_card, num_filters=args.codec_filters, hidden_size=args.codec_hidden)


def lm_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Model config fields of the demo LM on top of the `tiny` preset: exactly what `audiogen train --override`
    gets, so the base's config and the trained model's are the same config. The window is one clip, so training
    sees whole clips and a default-length generation needs no extension; extensions keep half a window."""
    return dict(name="audiogen-demo", dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                ffn_dim=4 * args.dim, window_duration=args.clip_seconds, extend_stride=args.clip_seconds / 2,
                max_duration=max(30.0, args.clip_seconds), default_duration=args.clip_seconds,
                top_k=min(TOP_K, args.codec_card))


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """`TrainingConfig` fields: a cosine schedule suits a run whose length is fixed in advance (the default
    inverse square root is for open-ended runs)."""
    return dict(lr=args.lr, schedule="cosine", warmup_steps=args.warmup_steps, min_lr_ratio=0.1,
                max_steps=args.steps, seed=args.seed)


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------
def run_corpus(work: Work, args: argparse.Namespace) -> None:
    from audiogen.data import synth

    for split, count in (("train", args.train_clips), ("heldout", args.heldout_clips)):
        if work.manifest(split).exists():
            say(f"corpus: {work.manifest(split)} exists")
            continue
        started = time.perf_counter()
        synth.write_corpus(work.corpus, count, args.seed, split, duration=args.clip_seconds)
        say(f"corpus: {count} {split} clips of {args.clip_seconds:g} s in {time.perf_counter() - started:.1f} s")


def run_codec(work: Work, args: argparse.Namespace) -> None:
    """Train, evaluate on the held-out clips, then move the finished directory into place in one rename."""
    from audiogen.codec_training import evaluate_codec, load_clips, train_codec

    def log(row: dict[str, float]) -> None:
        say(f"codec step {int(row['step'])}/{args.codec_steps}: loss {row['loss']:.3f} (spectral "
            f"{row['spectral']:.3f}, l1 {row['l1']:.4f}, SI-SNR {row['si_snr']:.1f} dB), codes used "
            f"{row.get('used_q0', 0.0):.2f}, {row['seconds']:.0f} s")

    codec, report = train_codec(str(work.manifest("train")), args.codec_steps, codec_options=codec_options(args),
                                seed=args.seed, batch_size=args.codec_batch, lr=args.codec_lr,
                                segment_seconds=min(1.0, args.clip_seconds), log=log)
    heldout = evaluate_codec(codec, load_clips(str(work.manifest("heldout")), codec.sample_rate))
    say(f"codec: held-out SI-SNR {heldout['si_snr_mean']:.2f} dB (median {heldout['si_snr_median']:.2f})")
    staging = work.codec.with_name(work.codec.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    codec.save_pretrained(staging)
    write_json(staging / work.codec_report.name,
               {"options": codec_options(args), "training": dataclasses.asdict(report), "heldout": heldout})
    os.replace(staging, work.codec)


def demo_config(codec: Any, args: argparse.Namespace) -> Any:
    """The demo LM config, built the way `audiogen train` builds a from-scratch config (`scratch_config`): the
    codec-facing fields from the base, everything else from the preset and `lm_overrides`."""
    from audiogen.config import AudioGenConfig
    from audiogen.training import scratch_config

    codec_side = AudioGenConfig.preset(PRESET, n_q=codec.n_q, card=codec.card, sample_rate=codec.sample_rate,
                                       frame_rate=codec.frame_rate, text_dim=args.text_dim,
                                       max_text_tokens=MAX_TEXT_TOKENS, top_k=min(TOP_K, codec.card))
    return scratch_config(PRESET, codec_side, args.text_dim, **lm_overrides(args))


def run_base(work: Work, args: argparse.Namespace) -> None:
    """Assemble T5 + tokenizer + trained codec + the step-0 LM (`scratch_model`: the training run's own
    initialisation) into an audiogen directory: the base of the train stage and the untrained demo model."""
    from audiogen.codec import Codec
    from audiogen.scratch import random_text_encoder, scratch_model

    codec = Codec.from_pretrained(work.codec)
    config = demo_config(codec, args)
    model = scratch_model(config, *random_text_encoder(args.seed, d_model=args.text_dim), codec, seed=args.seed,
                          source={"format": "audiogen-demo-base", "seed": args.seed})
    model.save_pretrained(work.base)
    parameters = model.metadata()["parameters"]
    model.close()
    say(f"base: {config.dim}-dim {config.num_layers}-layer LM ({parameters['lm'] / 1e6:.2f} M parameters), "
        f"{args.text_dim}-dim T5, codec {codec.n_q} x {codec.card} at {codec.frame_rate} Hz")


def run_encode(work: Work, args: argparse.Namespace) -> None:
    from pipelines.encode import EncodeOptions, run_encode as encode

    for split in ("train", "heldout"):
        output = work.codes(split)
        if (output / "summary.json").exists():
            say(f"encode: {output} exists")
            continue
        summary = encode(EncodeOptions(
            manifest=str(work.manifest(split)), output=str(output), codec=str(work.base),
            segment_seconds=args.clip_seconds, min_seconds=min(1.0, args.clip_seconds),
            encoder_gpus=1.0 if args.use_gpu else 0.0, progress=False))
        say(f"encode {split}: {summary['files_encoded_total']} clips -> {summary['segments_total']} segments, "
            f"{summary['files_errored_total']} unusable, {summary['wall_seconds']:.1f} s")
        if not summary["segments_total"]:
            raise RuntimeError(f"encoding {split} produced no segments: see {output / 'errors'}")
        if summary["files_errored_total"]:
            say(f"encode {split}: warning: {summary['files_errored_total']} clips unusable, see {output / 'errors'}")


def run_train(work: Work, args: argparse.Namespace) -> None:
    """From scratch on the train codes, validated on the held-out codes; exports the best checkpoint by
    held-out loss (a small corpus seen for many epochs can overfit before the schedule ends)."""
    from pipelines.train import TrainOptions, run_train as train

    summary = train(TrainOptions(
        data=str(work.codes("train")), val_data=str(work.codes("heldout")), storage=str(work.runs),
        name=RUN_NAME, preset=PRESET, base=str(work.base), overrides=lm_overrides(args),
        training=training_options(args), workers=args.workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, max_steps=args.steps,
        log_every=args.log_every, eval_every=args.eval_every, keep=2, export=str(work.model),
        export_best=True, seed=args.seed))
    write_json(work.train_summary, summary)
    final = summary["metrics"]
    say(f"train: step {final.get('step')}, loss {final.get('loss', float('nan')):.3f}, held-out loss "
        f"{final.get('val_loss', float('nan')):.3f}, exported {summary.get('exported_checkpoint')}")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def rates(items: list[dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    """Pass counts and rates per check of one audio source (generated, reference or codec)."""
    table: dict[str, dict[str, Any]] = {}
    for item in items:
        results = item[source] if source == "generated" else [item[source]]
        row = table.setdefault(item["check"], {"ok": 0, "n": 0})
        row["ok"] += sum(bool(r["ok"]) for r in results)
        row["n"] += len(results)
    for row in table.values():
        row["rate"] = row["ok"] / row["n"] if row["n"] else float("nan")
    return table


def run_evaluate(work: Work, args: argparse.Namespace) -> None:
    """Generate each held-out caption with `--eval-seeds` seeds and check it; the same checks on the reference
    clip and on its codec round trip give the ceilings the LM is judged against (metric and codec errors)."""
    from audiogen.data import synth
    from audiogen.eval.caption_checks import CHECKS
    from audiogen.model import AudioGen

    started = time.perf_counter()
    rows = synth.read_manifest(work.manifest("heldout"))[: args.eval_clips]
    measured = [row for row in rows if row["spec"].kind in CHECKS]
    model = AudioGen.from_pretrained(work.model, device="cuda" if args.use_gpu else "cpu")
    try:
        items = evaluate_rows(model, measured, work, args)
    finally:
        model.close()
    summary = {
        "clips": len(rows), "measured_clips": len(measured), "seeds": list(range(args.eval_seeds)),
        "duration": args.clip_seconds,
        "unmeasured_kinds": dict(Counter(row["spec"].kind for row in rows if row["spec"].kind not in CHECKS)),
        "rates": {source: rates(items, source) for source in ("generated", "reference", "codec")},
        "codec_si_snr_db": read_json(work.codec_report)["heldout"]["si_snr_mean"],
        "val_loss": best_val_loss(read_json(work.train_summary))[0],
        "seconds": round(time.perf_counter() - started, 1), "items": items,
    }
    write_model_card(work, args, summary)
    write_json(work.eval, summary)
    for check, row in summary["rates"]["generated"].items():
        say(f"evaluate: {check}: {row['ok']}/{row['n']} generated clips pass (reference "
            f"{summary['rates']['reference'][check]['rate']:.0%}, "
            f"codec {summary['rates']['codec'][check]['rate']:.0%})")


def evaluate_rows(model: Any, rows: list[dict[str, Any]], work: Work, args: argparse.Namespace
                  ) -> list[dict[str, Any]]:
    """Per held-out row: its check on every seed's generation, on the reference clip and on the codec round
    trip. The first seed's generation is kept in WORK/samples for listening."""
    from audiogen.eval.caption_checks import CHECKS, check, target
    from audiogen.io import read_audio, write_audio

    seeds = list(range(args.eval_seeds))
    prompts = [row["caption"] for row in rows for _ in seeds]
    say(f"evaluate: generating {len(prompts)} clips ({len(rows)} captions x {len(seeds)} seeds)")
    generated = model.generate(prompts, duration=args.clip_seconds, seed=seeds * len(rows)) if prompts else []
    work.samples.mkdir(exist_ok=True)
    rate = model.sample_rate
    items = []
    for index, row in enumerate(rows):
        spec = row["spec"]
        clips = generated[index * len(seeds):(index + 1) * len(seeds)]
        write_audio(work.samples / f"{row['id']}.wav", clips[0], rate)
        reference = read_audio(work.corpus / row["path"], sample_rate=rate, channels=1)[0][0]
        round_trip = model.decode(model.encode(reference, rate))[0]
        items.append({"id": row["id"], "caption": row["caption"], "kind": spec.kind, "check": CHECKS[spec.kind],
                      "target": target(spec),
                      "generated": [dict(check(spec, clip[0], rate), seed=seed) for seed, clip in zip(seeds, clips)],
                      "reference": check(spec, reference, rate), "codec": check(spec, round_trip, rate)})
    return items


def best_val_loss(train_summary: dict[str, Any]) -> tuple[float, int | None]:
    """(lowest held-out loss, the step it was measured at): what `export_best` exported. Reports between two
    evaluations repeat the last value, so the first report with the minimum is the evaluation step."""
    scored = [h for h in train_summary.get("history", []) if h.get("val_loss") is not None]
    if not scored:
        return float("nan"), None
    best = min(scored, key=lambda h: (h["val_loss"], h["step"]))
    return float(best["val_loss"]), int(best["step"])


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------
def write_model_card(work: Work, args: argparse.Namespace, evaluation: dict[str, Any]) -> None:
    """MODEL_CARD.md in the exported model: what it was trained on, how long, its losses and measured rates."""
    meta = read_json(work.model / "config.json")
    lines = ["# audiogen demo model", "", INTRO, "", *data_section(args), *codec_section(work, meta["config"]),
             *lm_section(work, args, meta), *evaluation_section(args, evaluation), *cost_section(work, args),
             "## Reproduce", "", "```", f"python jobs/demo_model.py WORK {' '.join(recipe_flags(args))}", "```", ""]
    (work.model / "MODEL_CARD.md").write_text("\n".join(lines))


INTRO = ("A small text-to-audio model trained from scratch by `jobs/demo_model.py` on the project's procedural "
         "sound corpus (`audiogen.data.synth`): tones, sweeps, sirens, coloured noise, beats, sequences and mixes, "
         "with captions such as \"square beeps at d4 at 90 bpm\" or \"pink noise, then fading pink noise\". It "
         "knows only those sounds and the words of `audiogen/data/words.txt` (other words are spelled out in "
         "characters it never saw): its text encoder is a random, frozen T5 with a word-level tokenizer, so every "
         "word's meaning was learned from the corpus alone.")


def data_section(args: argparse.Namespace) -> list[str]:
    return ["## Data", "",
            f"- train {args.train_clips} clips, held-out {args.heldout_clips} clips, {args.clip_seconds:g} s each, "
            f"16 kHz mono, corpus seed {args.seed}",
            "- held-out clips use caption templates, parameter combinations and value ranges absent from training",
            ""]


def codec_section(work: Work, config: dict[str, Any]) -> list[str]:
    report = read_json(work.codec_report)
    training = report["training"]
    return ["## Codec", "",
            f"- EnCodec architecture without adversarial losses, {training['codec']['parameters'] / 1e6:.2f} M "
            f"parameters, {config['n_q']} codebooks x {config['card']} codes at {config['frame_rate']} Hz",
            f"- {training['config']['steps']} steps of {training['config']['batch_size']} x "
            f"{training['config']['segment_seconds']:g} s crops, {training['seconds']:.0f} s; final loss "
            f"{training['history'][-1]['loss']:.3f} (spectral {training['history'][-1]['spectral']:.3f})",
            f"- held-out round trip SI-SNR (scale-invariant SNR of mean-removed signals, "
            f"`audiogen.eval.audio_metrics.si_snr`): mean {report['heldout']['si_snr_mean']:.2f} dB, median "
            f"{report['heldout']['si_snr_median']:.2f} dB", ""]


def lm_section(work: Work, args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
    config, train = meta["config"], read_json(work.train_summary)
    losses = [h for h in train.get("history", []) if h.get("loss") is not None]
    best, best_step = best_val_loss(train)
    lines = ["## Language model", "",
             f"- {config['dim']}-dim, {config['num_layers']} layers, {config['num_heads']} heads, "
             f"{config['window_duration']:g} s window; text width {config['text_dim']}",
             f"- {args.steps} steps of {args.workers} x {args.batch_size} clips, lr {args.lr:g} (cosine after "
             f"{args.warmup_steps} warmup steps); the exported weights are step {meta.get('source', {}).get('step')}, "
             f"the lowest held-out loss"]
    if losses:
        lines.append(f"- train loss {losses[0]['loss']:.3f} at step {losses[0]['step']} -> {losses[-1]['loss']:.3f} "
                     f"at step {losses[-1]['step']}")
    lines += [f"- held-out loss: best {best:.3f} (step {best_step}), last "
              f"{train['metrics'].get('val_loss', float('nan')):.3f}", ""]
    return lines


def evaluation_section(args: argparse.Namespace, evaluation: dict[str, Any]) -> list[str]:
    from audiogen.eval.caption_checks import RULES

    lines = ["## Measured on held-out captions", "",
             f"{evaluation['measured_clips']} captions x {len(evaluation['seeds'])} seeds, {args.clip_seconds:g} s, "
             "default sampling. Reference: the same check on the corpus clip; codec: on its codec round trip (the "
             "ceilings of the generated rate).", "",
             "| check | rule | generated | reference | codec |", "|---|---|---|---|---|"]
    table = evaluation["rates"]
    for check in table["generated"]:
        cells = [f"{table[s][check]['ok']}/{table[s][check]['n']} ({table[s][check]['rate']:.0%})"
                 for s in ("generated", "reference", "codec")]
        lines.append(f"| {check} | {RULES[check]} | {' | '.join(cells)} |")
    if evaluation["unmeasured_kinds"]:
        lines += ["", "Not measured (no single property to check): " + ", ".join(
            f"{kind} ({count})" for kind, count in sorted(evaluation["unmeasured_kinds"].items()))]
    return lines + [""]


def cost_section(work: Work, args: argparse.Namespace) -> list[str]:
    """Wall time of the stages finished so far (evaluation's own is in eval.json)."""
    if not work.stages.exists():
        return []
    where = f"{available_cpus()} CPU cores" + (", LM on GPU" if args.use_gpu else "")
    return ["## Cost", "", f"Wall time ({where}):", "", "| stage | seconds |", "|---|---|",
            *(f"| {name} | {info['seconds']:.0f} |" for name, info in read_json(work.stages).items()), ""]


def recipe_flags(args: argparse.Namespace) -> list[str]:
    """Every option of this run as flags, defaults included, so the card does not depend on future defaults."""
    flags = []
    for name, value in vars(args).items():
        if name in ("work", "stages", "ship") or value is False:
            continue
        flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[Work], bool]
    run: Callable[[Work, argparse.Namespace], None]


STAGES = (
    Stage("corpus", lambda w: all(w.manifest(s).exists() for s in ("train", "heldout")), run_corpus),
    Stage("codec", lambda w: w.codec_report.exists(), run_codec),
    Stage("base", lambda w: (w.base / "config.json").exists(), run_base),
    Stage("encode", lambda w: all((w.codes(s) / "summary.json").exists() for s in ("train", "heldout")), run_encode),
    Stage("train", lambda w: w.train_summary.exists(), run_train),
    Stage("evaluate", lambda w: w.eval.exists(), run_evaluate),
)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the demo model end to end (see the module docstring).")
    parser.add_argument("work", type=Path, help="work directory: every stage's output goes here")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], default=[s.name for s in STAGES],
                        help="run only these stages (the ones before them must be done)")
    parser.add_argument("--seed", type=int, default=0)
    data = parser.add_argument_group("corpus")
    data.add_argument("--train-clips", type=int, default=2000)
    data.add_argument("--heldout-clips", type=int, default=64)
    data.add_argument("--clip-seconds", type=float, default=5.0, help="clip length, also the LM window")
    codec = parser.add_argument_group("codec")
    codec.add_argument("--codec-steps", type=int, default=2000)
    codec.add_argument("--codec-batch", type=int, default=16, help="1 s crops per step")
    codec.add_argument("--codec-lr", type=float, default=1e-2, help="peak learning rate (cosine to a tenth)")
    codec.add_argument("--codec-card", type=int, default=256, help="codes per codebook (also the LM's card)")
    codec.add_argument("--codec-filters", type=int, default=8, help="SEANet base filters")
    codec.add_argument("--codec-hidden", type=int, default=64, help="latent width")
    lm = parser.add_argument_group("language model")
    lm.add_argument("--text-dim", type=int, default=128, help="width of the random frozen T5")
    lm.add_argument("--dim", type=int, default=256)
    lm.add_argument("--layers", type=int, default=6)
    lm.add_argument("--heads", type=int, default=8)
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=16, help="clips per worker and step")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--warmup-steps", type=int, default=200)
    train.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    train.add_argument("--cpus-per-worker", type=int, default=available_cpus(), help="also its torch threads")
    train.add_argument("--use-gpu", action="store_true", help="one GPU per worker; encoding and generation on GPU")
    train.add_argument("--log-every", type=int, default=25)
    train.add_argument("--eval-every", type=int, default=250, help="held-out loss + checkpoint interval")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-clips", type=int, default=64, help="held-out captions to generate")
    evaluation.add_argument("--eval-seeds", type=int, default=3, help="generations per caption")
    parser.add_argument("--ship", type=Path, default=None, metavar="DIR",
                        help="after the stages, write the model (float16 weights), its card and quality.json to DIR "
                             "(audiogen/weights/demo embeds it in the package)")
    return parser


def record_stage(work: Work, name: str, seconds: float) -> None:
    stages = read_json(work.stages) if work.stages.exists() else {}
    stages[name] = {"seconds": round(seconds, 1), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(work.stages, stages)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Work(args.work.expanduser().resolve())
    work.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for index, stage in enumerate(STAGES):
        if stage.name not in args.stages:
            continue
        if stage.done(work):
            say(f"{stage.name}: done before, skipped")
            continue
        missing = [s.name for s in STAGES[:index] if not s.done(work)]
        if missing:
            raise SystemExit(f"stage {stage.name} needs {', '.join(missing)} first")
        say(f"{stage.name}: start")
        started = time.perf_counter()
        stage.run(work, args)
        seconds = time.perf_counter() - started
        record_stage(work, stage.name, seconds)
        say(f"{stage.name}: finished in {seconds:.1f} s")
    if args.ship is not None:
        missing = [s.name for s in STAGES if not s.done(work)]
        if missing:
            raise SystemExit(f"--ship needs the stages {', '.join(missing)} first")
        ship(work, args.ship.expanduser().resolve())
    return 0


def shipped_source(source: dict[str, Any]) -> dict[str, Any]:
    """Provenance for the shipped copy: the recipe and the exported step, without the build machine's paths
    (they mean nothing in an installed package)."""
    return {"format": "audiogen-demo", "recipe": "jobs/demo_model.py", "step": source.get("step"),
            "base_seed": source.get("base", {}).get("seed")}


def ship(work: Work, destination: Path) -> None:
    """Write the evaluated model where the package embeds it (`audiogen/weights/demo`): the native format with
    float16 LM weights (half the size; the quality tests in tests/test_demo_model.py measure this copy), its
    model card and the measured rates (quality.json, without the per-clip items)."""
    import torch

    from audiogen.model import AudioGen

    model = AudioGen.from_pretrained(work.model, device="cpu")
    model.source = shipped_source(model.source)
    try:
        model.save_pretrained(destination, weights_dtype=torch.float16)
    finally:
        model.close()
    card = (work.model / "MODEL_CARD.md").read_text()
    (destination / "MODEL_CARD.md").write_text(card.replace(
        "## Data", "Shipped as `audiogen/weights/demo` with float16 LM weights (`jobs/demo_model.py --ship`).\n\n"
        "## Data", 1))
    evaluation = {key: value for key, value in read_json(work.eval).items() if key != "items"}
    write_json(destination / "quality.json", evaluation)
    size = sum(path.stat().st_size for path in destination.rglob("*") if path.is_file())
    say(f"ship: {destination} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
