"""The teachers QAT distils from: the top-k KL is the full KL coarsened to k tokens and a rest bucket."""

import pytest
import torch

from lowbit.surgery.teacher import LiveTeacher, TopKTeacher, kl_from_teacher, topk_kl
from tests.conftest import tiny_model


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    best = torch.log_softmax(logits, -1).topk(k, -1)
    return best.values, best.indices


def test_topk_kl_with_every_token_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 17, generator=g) * 3, torch.randn(2, 5, 17, generator=g) * 3
    assert topk_kl(student, *_top(teacher, 17)).item() == pytest.approx(kl_from_teacher(student, teacher).item(),
                                                                         rel=1e-5)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_kl_is_a_lower_bound_zero_at_the_teacher(k):
    """Coarsening can only lose divergence (data processing), and a student equal to the teacher scores zero."""
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(3, 7, 40, generator=g) * 2, torch.randn(3, 7, 40, generator=g) * 2
    coarse = topk_kl(student, *_top(teacher, k)).item()
    assert 0 < coarse < kl_from_teacher(student, teacher).item()
    assert topk_kl(teacher, *_top(teacher, k)).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_gradient_stays_finite_when_the_student_is_certain():
    teacher = torch.randn(1, 3, 30)
    student = torch.full((1, 3, 30), -1e4)
    values, indices = _top(teacher, 4)
    student.scatter_(-1, indices, 50.0)  # all the student's mass on the teacher's top 4
    student.requires_grad_(True)
    loss = topk_kl(student, values, indices)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_a_cached_teacher_scores_like_the_live_one_with_every_token():
    """Caching the whole vocabulary (k = vocab) gives the live teacher's KL on training and held-out rows."""
    model = tiny_model("llama").eval()
    g = torch.Generator().manual_seed(2)
    batches, held = torch.randint(0, 320, (3, 12), generator=g), torch.randint(0, 320, (2, 12), generator=g)
    cached = TopKTeacher.cache(model, batches, held, k=10_000, batch=2)
    live = LiveTeacher(batches, held, model)
    assert cached.values.shape == (3, 12, model.config.vocab_size) and cached.indices.dtype == torch.int32
    student = torch.randn(2, 12, model.config.vocab_size, generator=g)
    for rows, is_held in ((torch.tensor([2, 0]), False), (torch.tensor([1, 0]), True)):
        assert cached.kl(student, rows, is_held).item() == pytest.approx(live.kl(student, rows, is_held).item(),
                                                                          rel=1e-5)


def test_a_teacher_without_held_out_text_says_so():
    teacher = TopKTeacher(torch.zeros(1, 4, dtype=torch.long), None, torch.zeros(1, 4, 2),
                          torch.zeros(1, 4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="no held-out"):
        teacher.kl(torch.zeros(1, 4, 8), torch.tensor([0]), held=True)
