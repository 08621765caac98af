"""Stage (a) of the paper, "VL transformer learning": train an early-interaction ViLT whose
joint matching score ranks a whole gallery. Its result is the *teacher* — the baseline scorer,
the re-ranker, and the starting weights of decomposition (stage b, ``model.train``).

Real users start from a pretrained ViLT and skip this stage; the project runs it to make its
own demo teacher where no pretrained weights can be downloaded.

A matcher trained to beat one hard negative at a time does not learn to *order* many
candidates, which is what retrieval asks (the v1 demo teacher ranked 15 points below its own
student). The objective here follows ALBEF / BLIP, on one shared transformer, per batch of B
aligned pairs ``(t_i, v_i)``:

- **contrastive** (weight ``contrastive_weight``): the same transformer reads each text and
  each image alone (``VLDeformer.encode_tokens`` / ``encode_pixels``, ViLT's pooler) and an
  in-batch InfoNCE at ``temperature`` aligns them — cheap unimodal passes, B-1 negatives each;
- **listwise matching**: each caption is scored jointly against its image and K-1 other batch
  images — the ``hard_candidates`` the contrastive similarity confuses most, the rest random —
  and a softmax cross-entropy over the K joint scores asks the true image to come first; the
  same for each image against K captions. The matcher thus learns to re-rank exactly the
  shortlist it will be shown, and random candidates keep it sound on easy ones;
- **masked language modelling** (weight ``mlm_weight``) on the positive pairs, as ViLT's
  pretraining: predicting a masked colour, shape or relation word from the image is a dense
  grounding signal.

A caption may be true of several images (partial captions such as "a red circle"; twins are
not): ``truth[i, j]`` marks caption i true of image j, and such pairs are never negatives in
any of the three terms. On the synthetic scenes the truth comes from the scene specs
(:func:`model.synthetic.caption_truth`); on other data, from identical captions or images.

Each step costs ``B (2K - 1)`` joint passes plus ``2B`` unimodal ones. Training saves a
resumable checkpoint every ``save_every`` steps; ``resume=True`` continues from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from model.atomic import write_atomically
from model.data import OneCaptionPerImageSampler, PairDataset, collate_pairs, read_pairs
from model.modeling import EarlyInteraction, VLDeformer
from model.schedule import warmup_cosine_scheduler
from model.train import epoch_batches
from model.truth import TruthTable

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoint"


@dataclass(frozen=True)
class ItmConfig:
    """Settings of the teacher's training (stage a)."""

    init_model: str  # a ViLT checkpoint with a retrieval head (e.g. from init_vilt_checkpoint)
    data: str  # Karpathy / COCO / JSONL captions, as model.data.read_pairs reads them
    output_dir: str
    split: str = "train"
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1
    log_every: int = 25
    save_every: int = 200  # steps between resumable checkpoints; 0: none
    candidates: int = 8  # K: joint scores per query in the listwise matching loss
    hard_candidates: int = 4  # of the K-1 negatives, the most confused by the contrastive side
    contrastive_weight: float = 1.0  # 0 disables the contrastive term (negatives all random)
    temperature: float = 0.05  # of the contrastive term
    mlm_weight: float = 1.0  # 0 disables masked language modelling
    mlm_probability: float = 0.25  # share of caption words masked

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not 2 <= self.candidates <= self.batch_size:
            raise ValueError(
                f"candidates must be in [2, batch_size={self.batch_size}], got {self.candidates}"
            )
        if not 0 <= self.hard_candidates <= self.candidates - 1:
            raise ValueError(
                f"hard_candidates must be in [0, candidates - 1], got {self.hard_candidates}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def pick_candidates(
    similarity: torch.Tensor,
    truth: torch.Tensor,
    n_hard: int,
    n_total: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, ``n_total`` negative columns: the ``n_hard`` most similar columns that are
    not true of the row, then random other false columns (random order of ties).

    Returns ``(columns, valid)``, int64 and bool ``(rows, n_total)``; where a row has fewer
    false columns than asked, the missing slots repeat a column and are marked invalid.
    """
    rows, cols = similarity.shape
    noise = torch.rand((rows, cols), generator=generator)
    false = ~truth
    # Hard ones first (highest similarity), then a random order of the rest.
    hard_key = torch.where(false, similarity.float(), torch.tensor(-torch.inf))
    hard = hard_key.topk(min(n_hard, cols), dim=1).indices  # (rows, n_hard)
    taken = torch.zeros_like(false)
    taken.scatter_(1, hard, True)
    random_key = torch.where(false & ~taken, noise, torch.tensor(-1.0))
    rest = random_key.topk(min(n_total - hard.shape[1], cols), dim=1).indices
    columns = torch.cat([hard, rest], dim=1)[:, :n_total]
    valid = false.gather(1, columns)
    # A column may appear twice only when invalid (topk over -inf / -1 fill values).
    first = torch.ones_like(valid)
    for k in range(1, columns.shape[1]):
        first[:, k] = (columns[:, k : k + 1] != columns[:, :k]).all(dim=1)
    return columns, valid & first


def teacher_loss(
    teacher: EarlyInteraction,
    encoder: VLDeformer,
    batch: dict[str, torch.Tensor],
    truth: torch.Tensor,
    config: ItmConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The contrastive and listwise matching terms of the module docstring for one batch."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    n = input_ids.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    others_true = truth & ~eye  # never negatives
    losses: dict[str, torch.Tensor] = {}
    if config.contrastive_weight > 0:
        text = encoder.encode_tokens(input_ids, attention_mask)  # (B, D)
        image = encoder.encode_pixels(pixel_values, pixel_mask)  # (B, D)
        logits = (text @ image.T) / config.temperature  # (B, B): caption i vs image j
        target = torch.arange(n)
        losses["contrastive"] = 0.5 * (
            F.cross_entropy(logits.masked_fill(others_true, -torch.inf), target)
            + F.cross_entropy(logits.T.masked_fill(others_true.T, -torch.inf), target)
        )
        similarity = logits.detach()
    else:
        similarity = torch.zeros(n, n)
    negatives = config.candidates - 1
    hard = config.hard_candidates if config.contrastive_weight > 0 else 0
    image_of_text, ok_t = pick_candidates(similarity, truth, hard, negatives, generator)
    text_of_image, ok_i = pick_candidates(similarity.T, truth.T, hard, negatives, generator)
    rows = torch.arange(n)
    # One joint pass over: positives, (caption i, its K-1 images), (its K-1 captions, image j).
    text_index = torch.cat([rows, rows.repeat_interleave(negatives), text_of_image.reshape(-1)])
    image_index = torch.cat([rows, image_of_text.reshape(-1), rows.repeat_interleave(negatives)])
    scores = teacher.score_tensors(
        input_ids[text_index],
        attention_mask[text_index],
        pixel_values[image_index],
        pixel_mask[image_index],
    )
    positive = scores[:n, None]  # (B, 1)
    t2i = scores[n : n + n * negatives].view(n, negatives).masked_fill(~ok_t, -torch.inf)
    i2t = scores[n + n * negatives :].view(n, negatives).masked_fill(~ok_i, -torch.inf)
    zero = torch.zeros(n, dtype=torch.long)
    losses["matching"] = F.cross_entropy(torch.cat([positive, t2i], 1), zero) + F.cross_entropy(
        torch.cat([positive, i2t], 1), zero
    )
    return losses


class MaskedWordHead(torch.nn.Module):
    """Predicts masked words from the text positions of the joint sequence (tied decoder)."""

    def __init__(self, teacher: EarlyInteraction) -> None:
        super().__init__()
        self.teacher = teacher
        hidden = teacher.network.config.hidden_size
        self.transform = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.LayerNorm(hidden)
        )
        self.bias = torch.nn.Parameter(torch.zeros(teacher.network.config.vocab_size))

    def forward(
        self, batch: dict[str, torch.Tensor], probability: float, generator: torch.Generator
    ) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        special = torch.tensor(self.teacher.tokenizer.all_special_ids)
        maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
        masked = maskable & (torch.rand(input_ids.shape, generator=generator) < probability)
        if not masked.any():
            return input_ids.new_zeros((), dtype=torch.float32)
        corrupted = input_ids.masked_fill(masked, self.teacher.tokenizer.mask_token_id)
        hidden = self.teacher.network.vilt(
            input_ids=corrupted,
            attention_mask=attention_mask,
            pixel_values=batch["pixel_values"],
            pixel_mask=batch["pixel_mask"],
        ).last_hidden_state[:, : input_ids.shape[1]]  # (B, T, D): the text positions
        words = self.teacher.network.vilt.embeddings.text_embeddings.word_embeddings.weight
        logits = self.transform(hidden[masked]) @ words.T + self.bias  # (M, V)
        return F.cross_entropy(logits, input_ids[masked])


def _save_checkpoint(
    directory: Path, teacher: EarlyInteraction, state: dict[str, object], config: ItmConfig
) -> None:
    """Weights in the HF layout plus optimiser / schedule / RNG state; replaced atomically."""

    def write(partial: Path) -> None:
        teacher.save_pretrained(partial)
        torch.save(state, partial / "training_state.pt")
        (partial / "itm_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    write_atomically(directory, write)


def train_teacher(config: ItmConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the early-interaction teacher; returns the saved checkpoint directory.

    With ``resume``, continue from ``output_dir/checkpoint`` when it exists (same config).
    """
    out = Path(config.output_dir)
    checkpoint = out / CHECKPOINT_DIRNAME
    resuming = resume and (checkpoint / "training_state.pt").is_file()
    if resuming:
        saved = json.loads((checkpoint / "itm_config.json").read_text())
        if saved != dataclasses.asdict(config):
            raise ValueError(
                f"{checkpoint} was written with other settings; remove it or use the same ones "
                f"(saved: {saved})"
            )
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    teacher = EarlyInteraction.from_pretrained(
        checkpoint if resuming else config.init_model, device="cpu"
    )
    encoder = VLDeformer(teacher.network.vilt, teacher.tokenizer, teacher.image_processor)
    pairs = read_pairs(config.data, split=config.split)
    truth_table = TruthTable(pairs, config.data, config.split)
    dataset = PairDataset(
        pairs, teacher.tokenizer, teacher.image_processor, max_text_len=teacher.max_text_len
    )
    sampler = OneCaptionPerImageSampler(pairs, seed=config.seed)
    collate = functools.partial(collate_pairs, pad_token_id=teacher.tokenizer.pad_token_id)
    mlm_head = MaskedWordHead(teacher)
    trained = [*teacher.parameters(), *mlm_head.transform.parameters(), mlm_head.bias]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_scheduler(
        optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio
    )
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    if resuming:
        state = torch.load(checkpoint / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mlm_head.transform.load_state_dict(state["mlm_transform"])
        mlm_head.bias.data.copy_(state["mlm_bias"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        elapsed_before = state["elapsed_s"]
        logger.info("resuming the teacher from %s at step %d", checkpoint, step)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "itm_metrics.jsonl"
    teacher.train()
    started = time.perf_counter() - elapsed_before
    running: dict[str, list[float]] = {}
    logger.info(
        "teacher: %d pairs, truth from %s",
        len(pairs),
        "scene specs" if truth_table.from_scenes else "equal captions / images",
    )
    with (
        tqdm(
            total=config.max_steps,
            initial=step,
            desc="teacher (contrastive + listwise matching + MLM)",
            unit="step",
            disable=not progress,
        ) as bar,
        log_path.open("a") as log,
    ):
        while step < config.max_steps:
            # The epoch's batches, less those a resumed run already trained on (as model.train).
            batches = epoch_batches(sampler, epoch, config.batch_size, skip=batch_in_epoch)
            loader = DataLoader(
                dataset, batch_sampler=batches, num_workers=config.num_workers, collate_fn=collate
            )
            for batch in loader:
                truth = truth_table.batch(batch["index"].tolist())
                losses = teacher_loss(teacher, encoder, batch, truth, config, generator)
                if config.mlm_weight > 0:
                    losses["mlm"] = mlm_head(batch, config.mlm_probability, generator)
                weights = {"contrastive": config.contrastive_weight, "mlm": config.mlm_weight}
                loss = sum(weights.get(name, 1.0) * value for name, value in losses.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                for name, value in {"loss": loss, **losses}.items():
                    running.setdefault(name, []).append(float(value.detach()))
                bar.update(1)
                if step % config.log_every == 0 or step == config.max_steps:
                    record = {
                        "step": step,
                        "epoch": epoch,
                        **{
                            f"{k}_loss" if k != "loss" else k: float(np.mean(v))
                            for k, v in running.items()
                        },
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": round(time.perf_counter() - started, 1),
                    }
                    running.clear()
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                if config.save_every and step % config.save_every == 0 and step < config.max_steps:
                    _save_checkpoint(
                        checkpoint,
                        teacher,
                        {
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "mlm_transform": mlm_head.transform.state_dict(),
                            "mlm_bias": mlm_head.bias.detach().clone(),
                            "generator": generator.get_state(),
                            "torch_rng": torch.get_rng_state(),
                            "step": step,
                            "epoch": epoch,
                            "batch_in_epoch": batch_in_epoch,
                            "elapsed_s": time.perf_counter() - started,
                        },
                        config,
                    )
                if step >= config.max_steps:
                    break
            else:
                epoch += 1
                batch_in_epoch = 0
    teacher.eval()
    teacher.save_pretrained(out)
    (out / "itm_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    shutil.rmtree(checkpoint, ignore_errors=True)
    return out
