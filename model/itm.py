"""Stage (a) of the paper, "VL transformer learning": train an early-interaction ViLT on
image-text matching with hard negatives. Its result is the *teacher* — the baseline scorer,
the re-ranker, and the starting weights of decomposition (stage b, ``model.train``).

Real users start from a pretrained ViLT and skip this stage; the project runs it to make its
own demo teacher where no pretrained weights can be downloaded.

Objective (ViLT's image-text matching as a softmax over a positive and hard negatives), for a
batch of B aligned pairs ``(t_i, v_i)`` and the joint matching score ``s(t, v)``:

    L = CE([s(t_i, v_i), s(t_h(i), v_i)], 0) + CE([s(t_i, v_i), s(t_i, v_h(i))], 0)

averaged over i, where ``h(i)`` is the *hard* in-batch negative — the other pair whose caption
shares the most words with caption i (so colour-swapped and relation-swapped captions are
chosen first). Mining by caption words needs no model and works for any captioned dataset.
Each step costs 3B joint forward passes.

Masked language modelling on the positive pairs (as in ViLT's pretraining) is added with weight
``mlm_weight``: predicting a masked colour, shape or relation word from the image gives a dense
grounding signal that a from-scratch model learns much faster than from matching alone. Its head
(a linear layer tied to the word embeddings) exists only during training and is not saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from model.data import OneCaptionPerImageSampler, PairDataset, collate_pairs, read_pairs
from model.modeling import EarlyInteraction
from model.schedule import warmup_cosine_scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItmConfig:
    """Settings of the teacher's image-text matching training."""

    init_model: str  # a ViLT checkpoint with a retrieval head (e.g. from init_vilt_checkpoint)
    data: str  # Karpathy / COCO / JSONL captions, as model.data.read_pairs reads them
    output_dir: str
    split: str = "train"
    max_steps: int = 1000
    batch_size: int = 48
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1
    log_every: int = 25
    mlm_weight: float = 1.0  # 0 disables masked language modelling
    mlm_probability: float = 0.25  # share of caption words masked


def hardest_negatives(token_sets: list[set[int]], rng: np.random.Generator) -> np.ndarray:
    """For each row, the other row whose token set overlaps most (Jaccard); random tie-break."""
    n = len(token_sets)
    overlap = rng.random((n, n)) * 1e-6  # tie-break
    for i in range(n):
        for j in range(i + 1, n):
            union = len(token_sets[i] | token_sets[j]) or 1
            shared = len(token_sets[i] & token_sets[j]) / union
            overlap[i, j] += shared
            overlap[j, i] += shared
    np.fill_diagonal(overlap, -np.inf)
    return overlap.argmax(axis=1)


def itm_loss(
    teacher: EarlyInteraction, batch: dict[str, torch.Tensor], rng: np.random.Generator
) -> torch.Tensor:
    """The two-way matching loss of the module docstring for one batch."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    token_sets = [
        set(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask, strict=True)
    ]
    n = len(token_sets)
    rows = torch.arange(n)
    hard = torch.from_numpy(hardest_negatives(token_sets, rng))
    # One joint pass over: positives, (hard caption, image i), (caption i, hard image).
    text_index = torch.cat([rows, hard, rows])
    image_index = torch.cat([rows, rows, hard])
    scores = teacher.score_tensors(
        input_ids[text_index],
        attention_mask[text_index],
        pixel_values[image_index],
        pixel_mask[image_index],
    ).view(3, n)  # (3, B)
    target = torch.zeros(n, dtype=torch.long)
    wrong_text = torch.stack(
        [scores[0], scores[1]], dim=1
    )  # (B, 2): each image vs its hard caption
    wrong_image = torch.stack(
        [scores[0], scores[2]], dim=1
    )  # (B, 2): each caption vs its hard image
    return F.cross_entropy(wrong_text, target) + F.cross_entropy(wrong_image, target)


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


def train_teacher(config: ItmConfig) -> Path:
    """Train the early-interaction teacher; returns the saved checkpoint directory."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    teacher = EarlyInteraction.from_pretrained(config.init_model, device="cpu")
    pairs = read_pairs(config.data, split=config.split)
    dataset = PairDataset(
        pairs, teacher.tokenizer, teacher.image_processor, max_text_len=teacher.max_text_len
    )
    sampler = OneCaptionPerImageSampler(pairs, seed=config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.num_workers,
        collate_fn=functools.partial(collate_pairs, pad_token_id=teacher.tokenizer.pad_token_id),
    )
    mlm_head = MaskedWordHead(teacher)
    generator = torch.Generator().manual_seed(config.seed)
    trained = [*teacher.parameters(), *mlm_head.transform.parameters(), mlm_head.bias]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine_scheduler(
        optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio
    )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "itm_metrics.jsonl"
    teacher.train()
    step, epoch, started = 0, 0, time.perf_counter()
    running: list[float] = []
    running_mlm: list[float] = []
    with (
        tqdm(total=config.max_steps, desc="teacher (image-text matching)", unit="step") as bar,
        log_path.open("a") as log,
    ):
        while step < config.max_steps:
            sampler.set_epoch(epoch)
            for batch in loader:
                loss = itm_loss(teacher, batch, rng)
                if config.mlm_weight > 0:
                    mlm = mlm_head(batch, config.mlm_probability, generator)
                    loss = loss + config.mlm_weight * mlm
                    running_mlm.append(float(mlm))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                running.append(float(loss))
                bar.update(1)
                if step % config.log_every == 0 or step == config.max_steps:
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "loss": float(np.mean(running)),
                        "mlm_loss": float(np.mean(running_mlm)) if running_mlm else None,
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": round(time.perf_counter() - started, 1),
                    }
                    running.clear()
                    running_mlm.clear()
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                if step >= config.max_steps:
                    break
            epoch += 1
    teacher.eval()
    teacher.save_pretrained(out)
    (out / "itm_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return out
