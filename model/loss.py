"""The VLDeformer contrastive loss and contrastive-correct gradient accumulation.

:class:`ContrastiveLoss` is the paper's objective (arXiv 2110.11338): the text and image
embeddings of a batch are pooled, and every other embedding of *either* modality is a negative
("bi-modal hard negatives"); ``negatives="unimodal"`` gives plain symmetric InfoNCE for the
ablation.

:func:`contrastive_step` accumulates gradients over micro-batches the way a contrastive loss
needs (GradCache, Gao et al. 2021): the loss of a batch depends on every pair of embeddings in
it, so averaging per-micro-batch losses would shrink the set of negatives. Instead the full
batch is embedded once without a graph, the loss and its gradient with respect to the
embeddings are computed, and each micro-batch is embedded again with a graph and
back-propagated with its slice of that gradient. Parameter gradients equal those of one
backward over the whole batch, with the activation memory of one micro-batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Negatives = Literal["bimodal", "unimodal"]
NEGATIVE_MODES: tuple[str, ...] = get_args(Negatives)
# What a (caption, image) pair that is true but not the batch's own pair becomes
# (``ContrastiveLoss.forward``'s ``truth``): another positive, nothing, or a negative.
FalseNegatives = Literal["positive", "mask", "keep"]
FALSE_NEGATIVE_MODES: tuple[str, ...] = get_args(FalseNegatives)

# The temperature of the paper's released code: cosine similarities in [-1, 1] become logits
# in [-200, 200], a very sharp softmax that concentrates the loss on the hardest negatives.
DEFAULT_TEMPERATURE = 0.005


class ContrastiveLoss(nn.Module):
    """Contrastive loss over N (text, image) pairs with a fixed temperature ``tau``.

    Let ``t_1..t_N`` be the text and ``v_1..v_N`` the image embeddings (L2-normalised; this
    module does not normalise them), ``z = [t_1, .., t_N, v_1, .., v_N]`` the 2N pooled
    embeddings, ``s(a, b) = z_a . z_b / tau`` and ``p(a) = (a + N) mod 2N`` the index of
    anchor ``a``'s pair. Then::

        L = 1/(2N) * sum_{a=0}^{2N-1} [ -s(a, p(a)) + log sum_{b in C(a)} exp s(a, b) ]

    where the candidate set ``C(a)`` (always containing ``p(a)``) is

    - ``"bimodal"`` (the paper): every ``b != a``, so the 2N-2 negatives of each anchor are the
      other texts *and* the other images of the batch;
    - ``"unimodal"``: only the other modality, ``b`` in ``[N, 2N)`` for a text anchor and in
      ``[0, N)`` for an image anchor. This is standard symmetric InfoNCE,
      ``(L_text->image + L_image->text) / 2``, each term a mean over its N anchors.

    Both modes are a cross-entropy over the rows of one ``(2N, 2N)`` logit matrix in which the
    entries outside ``C(a)`` are ``-inf`` (:meth:`get_logits`) with targets ``p(a)``
    (:meth:`get_ground_truth`). The loss is computed in at least float32, so it is safe under
    autocast. The temperature is fixed (not learned); keep it in the training config.
    """

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        negatives: Negatives = "bimodal",
        false_negatives: FalseNegatives = "positive",
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
        if false_negatives not in FALSE_NEGATIVE_MODES:
            raise ValueError(
                f"false_negatives must be one of {FALSE_NEGATIVE_MODES}, got {false_negatives!r}"
            )
        self.temperature = float(temperature)
        self.negatives: Negatives = negatives
        self.false_negatives: FalseNegatives = false_negatives

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, negatives={self.negatives!r}, "
            f"false_negatives={self.false_negatives!r}"
        )

    def get_logits(
        self, text_emb: Tensor, image_emb: Tensor, truth: Tensor | None = None
    ) -> Tensor:
        """Similarity logits ``(2N, 2N)``: rows/columns are ``[texts; images]``.

        Entries that are not candidates of their row (self-similarity always; same-modality
        pairs too in ``"unimodal"`` mode) are ``-inf``. ``truth`` ``(N, N)`` bool (checked in
        every mode; ignored in ``"keep"``) marks caption ``a`` true of image ``b``
        (:class:`model.truth.TruthTable`): the two captions and the two images of such ``a``
        and ``b`` are no negatives of each other (``-inf``), and in ``"mask"`` mode neither is
        the pair itself (in ``"positive"`` mode it stays: :meth:`forward` counts it a positive).
        """
        _check_embeddings(text_emb, image_emb)
        dtype = torch.promote_types(text_emb.dtype, torch.float32)  # fp16/bf16 -> fp32
        pooled = torch.cat([text_emb, image_emb]).to(dtype)  # (2N, D)
        logits = pooled @ pooled.T / self.temperature  # (2N, 2N)
        n = text_emb.shape[0]
        position = torch.arange(2 * n, device=logits.device)
        if self.negatives == "bimodal":
            excluded = position[:, None] == position[None, :]  # (2N, 2N) the diagonal
        else:
            is_image = position >= n
            excluded = is_image[:, None] == is_image[None, :]  # (2N, 2N) same-modality blocks
        true = None if truth is None else _check_truth(truth, n).to(logits.device)
        if true is not None and self.false_negatives != "keep":
            either = true | true.T  # a and b describe each other's image
            cross = true if self.false_negatives == "mask" else torch.zeros_like(true)
            excluded = excluded | torch.cat(
                [torch.cat([either, cross], 1), torch.cat([cross.T, either], 1)], 0
            )
            excluded = excluded & ~(position[:, None] == (position[None, :] + n) % (2 * n))
        return logits.masked_fill(excluded, float("-inf"))

    def get_ground_truth(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """Target column of each of the 2N rows: text ``i`` -> image ``i`` and back. ``(2N,)``."""
        return (torch.arange(2 * n, device=device) + n) % (2 * n)

    def forward(self, text_emb: Tensor, image_emb: Tensor, truth: Tensor | None = None) -> Tensor:
        """Scalar mean loss of ``text_emb`` ``(N, D)`` against ``image_emb`` ``(N, D)``.

        ``truth`` ``(N, N)`` bool marks caption ``a`` true of image ``b`` (the diagonal
        always). By ``false_negatives``: ``"positive"`` — each anchor's term becomes
        ``-log sum_{b in P(a)} exp s(a, b) + log sum_{b in C(a)} exp s(a, b)`` over all its
        true pairs ``P(a)``: minus the log of the *summed* probability of the true pairs (the
        MIL-NCE form; UniCL averages the log over them instead), so a partial caption such as
        "a red circle" is no longer pushed away from the other images holding a red circle,
        and is satisfied once its true images together outrank the rest; ``"mask"`` — true
        pairs other than ``p(a)`` leave ``C(a)``; ``"keep"`` — ``truth`` is ignored (the
        paper's plain in-batch loss). In ``"positive"`` and ``"mask"`` the two captions and the
        two images of a true pair also leave ``C(a)`` (:meth:`get_logits`). With ``truth`` the
        identity, all three are the loss above.
        """
        n = text_emb.shape[0]
        logits = self.get_logits(text_emb, image_emb, truth)  # checks truth
        if truth is None or self.false_negatives != "positive":
            return F.cross_entropy(logits, self.get_ground_truth(n, logits.device))
        true = truth.to(device=logits.device, dtype=torch.bool)
        none = torch.zeros_like(true)
        positive = torch.cat([torch.cat([none, true], 1), torch.cat([true.T, none], 1)], 0)
        own = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
        return (torch.logsumexp(logits, dim=1) - own).mean()


def _check_truth(truth: Tensor, n: int) -> Tensor:
    if truth.shape != (n, n):
        raise ValueError(f"truth must be ({n}, {n}), got {tuple(truth.shape)}")
    if not bool(truth.diagonal().all()):
        raise ValueError("truth must be true on its diagonal: each caption is true of its image")
    return truth.to(dtype=torch.bool)


def _check_embeddings(text_emb: Tensor, image_emb: Tensor) -> None:
    if text_emb.ndim != 2 or image_emb.ndim != 2:
        raise ValueError(
            "embeddings must be (N, D); got text "
            f"{tuple(text_emb.shape)} and image {tuple(image_emb.shape)}"
        )
    if text_emb.shape != image_emb.shape:
        raise ValueError(
            "text and image embeddings must have the same (N, D); got text "
            f"{tuple(text_emb.shape)} and image {tuple(image_emb.shape)}"
        )
    if text_emb.shape[0] < 1:
        raise ValueError("the loss needs at least one pair, got N=0")


# ------------------------------------------------------------------ gradient accumulation

Encoder = Callable[..., Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _RngSnapshot:
    """Torch RNG state (CPU and every CUDA device in use), so dropout can be replayed."""

    cpu_state: Tensor
    cuda_states: tuple[Tensor, ...]  # empty when CUDA has not been initialised

    @classmethod
    def capture(cls) -> _RngSnapshot:
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), tuple(cuda_states))

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this state; the global RNG is left as it was before."""
        with torch.random.fork_rng(devices=list(range(len(self.cuda_states)))):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_states:
                torch.cuda.set_rng_state_all(list(self.cuda_states))
            yield


def _batch_size(inputs: Mapping[str, Tensor], name: str) -> int:
    if not inputs:
        raise ValueError(f"{name} is empty; expected a mapping of keyword name -> tensor")
    sizes = {key: int(tensor.shape[0]) for key, tensor in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all tensors of {name} must share their first dimension, got {sizes}")
    return next(iter(sizes.values()))


def _micro_batches(
    inputs: Mapping[str, Tensor], size: int, device: torch.device | str | None
) -> list[dict[str, Tensor]]:
    total = next(iter(inputs.values())).shape[0]
    return [
        {
            key: tensor[start : start + size].to(device, non_blocking=True)
            if device is not None
            else tensor[start : start + size]
            for key, tensor in inputs.items()
        }
        for start in range(0, total, size)
    ]


def contrastive_step(
    encode_text: Encoder,
    encode_images: Encoder,
    text_inputs: Mapping[str, Tensor],
    image_inputs: Mapping[str, Tensor],
    loss_fn: LossFn,
    micro_batch_size: int | None = None,
    *,
    device: torch.device | str | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    """Forward and backward of one contrastive batch, in micro-batches; returns the loss.

    Accumulates into ``.grad`` of the encoders' parameters exactly the gradients of
    ``loss_fn(encode_text(**text_inputs), encode_images(**image_inputs)).backward()`` over
    the whole batch, while holding the autograd graph of only one micro-batch at a time.
    The caller zeroes gradients before and steps the optimiser after, as usual.

    Args:
        encode_text: called as ``encode_text(**micro_text_inputs)`` and returning ``(n, D)``
            embeddings, e.g. ``VLDeformer.encode_tokens`` (keywords ``input_ids``,
            ``attention_mask``).
        encode_images: called as ``encode_images(**micro_image_inputs)`` -> ``(n, D)``, e.g.
            ``VLDeformer.encode_pixels`` (keywords ``pixel_values``, ``pixel_mask``).
        text_inputs, image_inputs: keyword name -> tensor, every tensor with the batch
            dimension ``N`` first (the same N for both); micro-batches are slices along it.
            Text padded to the whole batch's longest caption stays so; the attention mask
            makes that harmless.
        loss_fn: ``(text_emb (N, D), image_emb (N, D)) -> scalar``, e.g. a
            :class:`ContrastiveLoss`.
        micro_batch_size: rows per forward pass with a graph. ``None`` or ``>= N``: one plain
            forward/backward over the whole batch (no re-encoding cost).
        device: if given, each micro-batch is moved there just before it is encoded, so the
            full batch can wait in (pinned) host memory.
        scaler: an fp16 ``GradScaler``; the gradients accumulated are then scaled as
            ``scaler.scale(loss).backward()`` would scale them (call ``scaler.step`` after).

    Returns:
        The batch loss, detached.

    Requirements on the encoders: each row's embedding must not depend on the other rows of
    its micro-batch (LayerNorm models like ViLT qualify; BatchNorm does not), and the module
    mode (train/eval) must stay the same during the call. Dropout is replayed exactly: the
    RNG state before each micro-batch's first pass is restored for its second pass, so
    pass-2 activations and gradients match pass 1. Micro-batches are encoded texts first,
    then images, each in order. Single process only: with DistributedDataParallel, gather
    the embeddings across ranks inside ``loss_fn`` and use ``no_sync`` for all but the last
    backward.
    """
    n = _batch_size(text_inputs, "text_inputs")
    n_images = _batch_size(image_inputs, "image_inputs")
    if n != n_images:
        raise ValueError(f"text_inputs hold {n} rows but image_inputs hold {n_images}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    size = n if micro_batch_size is None else min(micro_batch_size, n)
    text_chunks = _micro_batches(text_inputs, size, device)
    image_chunks = _micro_batches(image_inputs, size, device)
    if len(text_chunks) == 1:  # the whole batch fits: a plain step, no re-encoding
        loss = loss_fn(encode_text(**text_chunks[0]), encode_images(**image_chunks[0]))
        backward(loss)
        return loss.detach()

    # Pass 1: embed the whole batch without a graph, remembering the RNG state of each chunk.
    text_rng: list[_RngSnapshot] = []
    image_rng: list[_RngSnapshot] = []
    with torch.no_grad():
        text_parts = []
        for chunk in text_chunks:
            text_rng.append(_RngSnapshot.capture())
            text_parts.append(encode_text(**chunk))
        image_parts = []
        for chunk in image_chunks:
            image_rng.append(_RngSnapshot.capture())
            image_parts.append(encode_images(**chunk))
    text_emb = torch.cat(text_parts).requires_grad_()  # (N, D) leaf
    image_emb = torch.cat(image_parts).requires_grad_()  # (N, D) leaf

    # d loss / d embedding for the full batch.
    loss = loss_fn(text_emb, image_emb)
    backward(loss)
    assert text_emb.grad is not None and image_emb.grad is not None
    text_grads = text_emb.grad.split(size)
    image_grads = image_emb.grad.split(size)

    # Pass 2: re-embed each chunk with a graph, replaying its dropout, and push its gradient
    # slice into the parameters (the chain rule through the cached embeddings).
    for encode, chunks, snapshots, grads in (
        (encode_text, text_chunks, text_rng, text_grads),
        (encode_images, image_chunks, image_rng, image_grads),
    ):
        for chunk, snapshot, grad in zip(chunks, snapshots, grads, strict=True):
            with snapshot.replay():
                embedding = encode(**chunk)  # (n, D)
            embedding.backward(grad.to(embedding.dtype))
    logger.debug("contrastive step: N=%d in micro-batches of %d", n, size)
    return loss.detach()
