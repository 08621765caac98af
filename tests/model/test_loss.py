"""ContrastiveLoss against a hand computation; contrastive_step against one big backward."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.loss import DEFAULT_TEMPERATURE, ContrastiveLoss, contrastive_step

MODES = ("bimodal", "unimodal")


def _unit(rows: list[list[float]]) -> list[list[float]]:
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]


# Three pairs in 3-D; unit rows, not orthogonal, so every similarity matters.
TEXTS = _unit([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.4, -0.2, 1.0]])
IMAGES = _unit([[0.9, -0.1, 0.3], [0.5, 0.8, -0.2], [-0.3, 0.6, 0.7]])


def _hand_loss(texts: list[list[float]], images: list[list[float]], tau: float, mode: str) -> float:
    """The paper's formula with python loops: mean over 2N anchors of -s(a, p) + logsumexp."""
    pooled = texts + images
    n = len(texts)
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        logits = []
        for b in range(2 * n):
            if b == a:
                continue
            same_modality = (a < n) == (b < n)
            if mode == "unimodal" and same_modality:
                continue
            logits.append(sum(x * y for x, y in zip(pooled[a], pooled[b], strict=True)) / tau)
        top = max(logits)
        logsumexp = top + math.log(sum(math.exp(s - top) for s in logits))
        similarity = sum(x * y for x, y in zip(pooled[a], pooled[positive], strict=True))
        total += logsumexp - similarity / tau
    return total / (2 * n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [0.005, 0.1, 1.0])
def test_loss_matches_hand_computation(mode: str, tau: float) -> None:
    loss_fn = ContrastiveLoss(temperature=tau, negatives=mode)  # type: ignore[arg-type]
    loss = loss_fn(
        torch.tensor(TEXTS, dtype=torch.float64), torch.tensor(IMAGES, dtype=torch.float64)
    )
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_hand_loss(TEXTS, IMAGES, tau, mode), rel=1e-12)


def test_modes_differ_and_unimodal_is_symmetric_infonce() -> None:
    texts = torch.tensor(TEXTS, dtype=torch.float64)
    images = torch.tensor(IMAGES, dtype=torch.float64)
    bimodal = ContrastiveLoss(0.1, "bimodal")(texts, images)
    unimodal = ContrastiveLoss(0.1, "unimodal")(texts, images)
    # Extra negatives can only add mass to each log-sum-exp.
    assert bimodal.item() > unimodal.item()
    similarity = texts @ images.T / 0.1
    targets = torch.arange(3)
    clip = (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2
    assert unimodal.item() == pytest.approx(clip.item(), rel=1e-12)


# Texts 0 and 1 are near-duplicates (cosine 0.9996), closer to each other than to any image:
# at tau = 0.005 only such same-modality hard negatives tell the two modes apart (for the
# pairs above, the extra negatives change the loss by less than 1e-12).
NEAR_TEXTS = _unit([[1.0, 0.2, 0.0], [1.0, 0.22, 0.02], [0.0, 0.3, 1.0]])
NEAR_IMAGES = _unit([[0.9, 0.6, -0.2], [0.8, 0.1, 0.6], [0.3, 0.8, 0.9]])


def test_modes_differ_at_the_default_temperature_with_same_modality_near_duplicates() -> None:
    assert DEFAULT_TEMPERATURE == 0.005
    texts = torch.tensor(NEAR_TEXTS, dtype=torch.float64)
    images = torch.tensor(NEAR_IMAGES, dtype=torch.float64)
    losses = {}
    for mode in MODES:
        loss = ContrastiveLoss(DEFAULT_TEMPERATURE, mode)(texts, images).item()  # type: ignore[arg-type]
        assert loss == pytest.approx(_hand_loss(NEAR_TEXTS, NEAR_IMAGES, 0.005, mode), rel=1e-9)
        losses[mode] = loss
    # Each near-duplicate text is a bi-modal negative of the other, 18 to 38 logits above its pair.
    assert losses["bimodal"] - losses["unimodal"] > 5.0, losses


def test_logits_mask_and_ground_truth() -> None:
    texts = torch.tensor(TEXTS)
    images = torch.tensor(IMAGES)
    bimodal = ContrastiveLoss(0.5, "bimodal").get_logits(texts, images)
    unimodal = ContrastiveLoss(0.5, "unimodal").get_logits(texts, images)
    assert bimodal.shape == unimodal.shape == (6, 6)
    assert torch.isinf(bimodal).sum() == 6 and torch.isinf(bimodal.diagonal()).all()
    assert torch.isinf(unimodal[:3, :3]).all() and torch.isinf(unimodal[3:, 3:]).all()
    assert torch.isfinite(unimodal[:3, 3:]).all() and torch.isfinite(unimodal[3:, :3]).all()
    assert ContrastiveLoss().get_ground_truth(3).tolist() == [3, 4, 5, 0, 1, 2]


def _hand_loss_with_truth(tau: float, mode: str, truth: list[list[bool]], fn: str) -> float:
    """As :func:`_hand_loss` with ``truth``: the two texts or the two images of a and b are
    never negatives when truth[a][b] or truth[b][a]; caption a vs image b (and back) when
    truth[a][b] is left out (``fn`` "mask") or is one more positive (``fn`` "positive":
    -log of the summed exp over the positives)."""
    pooled = TEXTS + IMAGES
    n = len(TEXTS)
    total = 0.0
    for a in range(2 * n):
        logits, positives = [], []
        for b in range(2 * n):
            ia, ib = a % n, b % n
            text_a, text_b = a < n, b < n
            if b == a or (mode == "unimodal" and text_a == text_b):
                continue
            if text_a == text_b and (truth[ia][ib] or truth[ib][ia]):
                continue
            similarity = sum(x * y for x, y in zip(pooled[a], pooled[b], strict=True)) / tau
            if text_a != text_b:
                caption, image = (ia, ib) if text_a else (ib, ia)
                if truth[caption][image]:
                    if fn == "mask" and ia != ib:
                        continue
                    if fn == "positive" or ia == ib:
                        positives.append(similarity)
            logits.append(similarity)
        total += _logsumexp(logits) - _logsumexp(positives)
    return total / (2 * n)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("false_negatives", ["positive", "mask", "keep"])
def test_true_pairs_are_positives_left_out_or_kept(mode: str, false_negatives: str) -> None:
    texts = torch.tensor(TEXTS, dtype=torch.float64)
    images = torch.tensor(IMAGES, dtype=torch.float64)
    loss_fn = ContrastiveLoss(0.1, mode, false_negatives)  # type: ignore[arg-type]
    plain = loss_fn(texts, images).item()
    assert plain == pytest.approx(_hand_loss(TEXTS, IMAGES, 0.1, mode), rel=1e-12)
    # Only the diagonal true: the plain loss in every mode.
    eye = torch.eye(3, dtype=torch.bool)
    assert loss_fn(texts, images, eye).item() == pytest.approx(plain, rel=1e-12)
    # Caption 0 is also true of image 2 (a partial caption such as "a red circle").
    truth = eye.clone()
    truth[0, 2] = True
    loss = loss_fn(texts, images, truth).item()
    if false_negatives == "keep":
        assert loss == pytest.approx(plain, rel=1e-12)
    else:
        hand = _hand_loss_with_truth(0.1, mode, truth.tolist(), false_negatives)
        assert loss == pytest.approx(hand, rel=1e-12)
        assert loss < plain  # a negative less, or a positive more
    logits = loss_fn.get_logits(texts, images, truth)
    left_out = bool(torch.isinf(logits[0, 3 + 2])) and bool(torch.isinf(logits[3 + 2, 0]))
    assert left_out == (false_negatives == "mask")
    assert torch.isfinite(logits[0, 3 + 0]) and torch.isfinite(logits[3 + 2, 2])  # own pairs stay
    with pytest.raises(ValueError, match=r"truth must be \(3, 3\), got \(2, 2\)"):
        loss_fn(texts, images, eye[:2, :2])
    with pytest.raises(ValueError, match="diagonal"):
        loss_fn(texts, images, ~eye)


@pytest.mark.parametrize("false_negatives", ["positive", "mask"])
def test_gradcache_with_truth_matches_one_big_batch(false_negatives: str) -> None:
    # The trainer passes the batch's truth through functools.partial; micro-batches must not
    # change what it means.
    text_encoder, image_encoder, text_inputs, image_inputs = _setup(dropout=0.0)
    truth = torch.eye(8, dtype=torch.bool)
    truth[0, 3] = truth[5, 1] = truth[2, 6] = True
    loss_fn = functools.partial(
        ContrastiveLoss(0.1, "bimodal", false_negatives),  # type: ignore[arg-type]
        truth=truth,
    )
    reference_loss = loss_fn(text_encoder(**text_inputs), image_encoder(**image_inputs))
    reference_loss.backward()
    reference = _grads(text_encoder, image_encoder)
    plain = ContrastiveLoss(0.1)(text_encoder(**text_inputs), image_encoder(**image_inputs))
    assert reference_loss.item() < plain.item()
    loss = contrastive_step(text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, 3)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-12)
    _assert_same(_grads(text_encoder, image_encoder), reference)


def test_low_precision_embeddings_give_float32_loss() -> None:
    texts = torch.tensor(TEXTS)
    images = torch.tensor(IMAGES)
    loss_fn = ContrastiveLoss(0.1)
    loss = loss_fn(texts.bfloat16(), images.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(texts, images).item(), rel=2e-2)


def test_loss_validates_arguments() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        ContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match="'both'"):
        ContrastiveLoss(negatives="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="false_negatives must be one of"):
        ContrastiveLoss(false_negatives="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"text \(3, 3\) and image \(2, 3\)"):
        ContrastiveLoss()(torch.tensor(TEXTS), torch.tensor(IMAGES[:2]))


# ----------------------------------------------------------------------- GradCache


class TinyTextEncoder(nn.Module):
    """Token embedding, masked mean, projection, optional dropout, L2 normalisation."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 4)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)  # (B, T, 1)
        hidden = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)  # (B, 8)
        return F.normalize(self.proj(self.dropout(hidden)), dim=-1)  # (B, 4)


class TinyImageEncoder(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 4)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> Tensor:
        masked = pixel_values * pixel_mask.unsqueeze(1)  # (B, 3, H, W)
        return F.normalize(self.proj(self.dropout(masked.flatten(1))), dim=-1)  # (B, 4)


def _setup(dropout: float, n: int = 8) -> tuple[nn.Module, nn.Module, dict, dict]:
    torch.manual_seed(0)
    text_encoder = TinyTextEncoder(dropout).double()
    image_encoder = TinyImageEncoder(dropout).double()
    lengths = torch.randint(2, 6, (n,))
    text_inputs = {
        "input_ids": torch.randint(0, 20, (n, 6)),
        "attention_mask": (torch.arange(6)[None, :] < lengths[:, None]).long(),
    }
    pixel_mask = torch.ones(n, 4, 4, dtype=torch.long)
    pixel_mask[::3, :, 3] = 0
    image_inputs = {
        "pixel_values": torch.randn(n, 3, 4, 4, dtype=torch.float64),
        "pixel_mask": pixel_mask,
    }
    return text_encoder, image_encoder, text_inputs, image_inputs


def _grads(*modules: nn.Module) -> list[Tensor]:
    grads = []
    for module in modules:
        for parameter in module.parameters():
            assert parameter.grad is not None
            grads.append(parameter.grad.clone())
            parameter.grad = None
    return grads


def _assert_same(left: list[Tensor], right: list[Tensor]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro_batch_size", [2, 3])
def test_gradcache_matches_one_big_batch(mode: str, micro_batch_size: int) -> None:
    text_encoder, image_encoder, text_inputs, image_inputs = _setup(dropout=0.0)
    loss_fn = ContrastiveLoss(temperature=0.1, negatives=mode)  # type: ignore[arg-type]

    reference_loss = loss_fn(text_encoder(**text_inputs), image_encoder(**image_inputs))
    reference_loss.backward()
    reference = _grads(text_encoder, image_encoder)

    loss = contrastive_step(
        text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, micro_batch_size
    )
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-12)
    assert not loss.requires_grad
    _assert_same(_grads(text_encoder, image_encoder), reference)

    # The equivalence is not trivial: averaging per-micro-batch losses (fewer negatives)
    # gives different gradients.
    chunks = range(0, 8, micro_batch_size)
    for start in chunks:
        part = slice(start, start + micro_batch_size)
        naive = loss_fn(
            text_encoder(**{k: v[part] for k, v in text_inputs.items()}),
            image_encoder(**{k: v[part] for k, v in image_inputs.items()}),
        )
        (naive / len(chunks)).backward()
    naive_grads = _grads(text_encoder, image_encoder)
    assert not all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(naive_grads, reference, strict=True)
    )


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_gradcache_replays_dropout(mode: str, device: str) -> None:
    text_encoder, image_encoder, text_inputs, image_inputs = _setup(dropout=0.5)
    text_encoder.to(device)
    image_encoder.to(device)
    loss_fn = ContrastiveLoss(temperature=0.1, negatives=mode)  # type: ignore[arg-type]

    def chunked_with_graph(seed: int) -> list[Tensor]:
        """One backward over the whole batch, encoded chunk by chunk in GradCache's order."""
        torch.manual_seed(seed)
        texts = [
            text_encoder(**{k: v[s : s + 2].to(device) for k, v in text_inputs.items()})
            for s in range(0, 8, 2)
        ]
        images = [
            image_encoder(**{k: v[s : s + 2].to(device) for k, v in image_inputs.items()})
            for s in range(0, 8, 2)
        ]
        loss_fn(torch.cat(texts), torch.cat(images)).backward()
        return _grads(text_encoder, image_encoder)

    reference = chunked_with_graph(seed=1)
    torch.manual_seed(1)
    # Inputs stay on the host; each micro-batch moves to the encoders' device.
    contrastive_step(
        text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, 2, device=device
    )
    _assert_same(_grads(text_encoder, image_encoder), reference)

    # Dropout masks really change the gradients, so the match above needs the replay.
    other_seed = chunked_with_graph(seed=2)
    assert not all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(other_seed, reference, strict=True)
    )


def test_whole_batch_path_and_grad_scaler() -> None:
    text_encoder, image_encoder, text_inputs, image_inputs = _setup(dropout=0.0)
    loss_fn = ContrastiveLoss(temperature=0.1)
    contrastive_step(text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, None)
    whole = _grads(text_encoder, image_encoder)
    contrastive_step(text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, 8)
    _assert_same(_grads(text_encoder, image_encoder), whole)

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    contrastive_step(
        text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, 2, scaler=scaler
    )
    _assert_same(_grads(text_encoder, image_encoder), [4.0 * grad for grad in whole])


def test_contrastive_step_validates_inputs() -> None:
    text_encoder, image_encoder, text_inputs, image_inputs = _setup(dropout=0.0)
    loss_fn = ContrastiveLoss()
    short_images = {k: v[:6] for k, v in image_inputs.items()}
    with pytest.raises(ValueError, match="text_inputs hold 8 rows but image_inputs hold 6"):
        contrastive_step(text_encoder, image_encoder, text_inputs, short_images, loss_fn, 2)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1 or None, got 0"):
        contrastive_step(text_encoder, image_encoder, text_inputs, image_inputs, loss_fn, 0)
    ragged = {**text_inputs, "attention_mask": text_inputs["attention_mask"][:5]}
    with pytest.raises(ValueError, match="share their first dimension"):
        contrastive_step(text_encoder, image_encoder, ragged, image_inputs, loss_fn, 2)
