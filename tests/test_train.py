import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.distill import Teacher, distilled, read_features
from carprune.train import augment

from .conftest import subset


def test_short_training_lowers_the_loss(fmnist):
    torch.manual_seed(0)
    model = cp.create_model("convnet", widths=(8, 16, 16), hidden=32)
    data = subset(fmnist.train, 2048)
    before = cp.evaluate(model, data).loss
    log = cp.fit(model, data, 3, cp.Recipe(lr=0.05), progress=False)
    after = cp.evaluate(model, data).loss
    assert after < 0.75 * before
    assert log[1]["train_loss"] < log[0]["train_loss"]


def test_augment_translates_and_flips_only():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = augment(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):  # with no padding, only flips are possible
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape


def test_runs_of_a_few_steps_train(fmnist):
    """1 to 8 optimizer steps (OneCycleLR divided by zero at four, and took one or two steps
    at about lr / 25 / 10^4): one epoch logged, and every weight tensor moved by more than
    rounding."""
    for steps in range(1, 9):
        torch.manual_seed(0)
        model = cp.create_model("convnet", widths=(8, 16, 16), hidden=32)
        before = [p.detach().clone() for p in model.parameters() if p.ndim > 1]
        log = cp.fit(model, subset(fmnist.train, 128 * steps), 1, cp.Recipe(lr=0.05),
                     progress=False)
        after = [p.detach() for p in model.parameters() if p.ndim > 1]
        assert len(log) == 1
        assert all(float((a - b).abs().max()) > 1e-4 for a, b in zip(before, after, strict=True))


def test_distilled_is_the_hand_formula():
    """0.9 of T^2 x KL(teacher || student) of the outputs softened at T = 4, plus 0.1 of the
    cross-entropy, written out with softmax and logs."""
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    p_s, p_t = torch.softmax(s / 4, 1), torch.softmax(t / 4, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    assert float(distilled(s, t, y)) == pytest.approx(float(0.9 * 16 * kl + 0.1 * ce), rel=1e-5)


def hidden(width: int = 5) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Dropout(0.0),
                         nn.Linear(width, 3))


def test_fit_with_a_teacher_takes_the_distilled_step():
    """One step on one batch, no augmentation or weight decay: a run too short for a cycle
    runs at the learning rate, and SGD's first Nesterov step (momentum 0.9) moves by 1.9 x the
    rate x the gradient of the loss: the distilled outputs
    plus 10 x the squared difference of the classifier's features (the dropout's input) over
    the teacher's mean square (the teacher's outputs held fixed); the teacher does not move."""
    torch.manual_seed(0)
    student, teacher = hidden(), hidden()
    x, y = torch.randn(8, 1, 3, 4), torch.randint(0, 3, (8,))
    expected = copy.deepcopy(student)
    features, taught = expected[:3](x), teacher[:3](x).detach()
    loss = (distilled(expected(x), teacher(x).detach(), y)
            + 10 * ((features - taught) ** 2).mean() / (taught ** 2).mean())
    grads = torch.autograd.grad(loss, list(expected.parameters()))
    teacher_before = copy.deepcopy(teacher.state_dict())
    cp.fit(student, TensorDataset(x, y), 1, cp.Recipe(lr=0.1, batch_size=8, weight_decay=0,
                                                      shift_and_flip=False, teacher=teacher),
           progress=False)
    for p, p0, g in zip(student.parameters(), expected.parameters(), grads, strict=True):
        torch.testing.assert_close(p.detach(), p0.detach() - 1.9 * 0.1 * g)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_the_hint_reads_the_features_before_dropout_and_only_where_they_were_kept():
    """The features are the input of the dropout before the classifier, or of the classifier
    where none runs before it (none without conv or linear layers); a student whose features
    were pruned learns the outputs only."""
    image, net = torch.randn(1, 1, 3, 4), hidden()
    assert read_features(net, image)[0] is net[3]
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    assert read_features(plain, image)[0] is plain[3]
    assert read_features(nn.Flatten(), image)[0] is None
    assert Teacher.check(hidden(), hidden(), image).reads is not None
    assert Teacher.check(hidden(), hidden(4), image).reads is None


def test_a_teacher_with_other_outputs_is_refused():
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = TensorDataset(torch.randn(8, 1, 3, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(cp.CarpruneError, match=r"the teacher gives \(1, 4\) outputs for an image "
                       r"where the network gives \(1, 3\)"):
        cp.fit(student, data, 1, cp.Recipe(teacher=nn.Sequential(nn.Flatten(), nn.Linear(12, 4))),
               progress=False)


@pytest.mark.parametrize("bad", [{"lr": 0}, {"batch_size": 0}, {"weight_decay": -1e-4},
                                 {"workers": -1}])
def test_a_recipe_checks_itself(bad):
    with pytest.raises(cp.CarpruneError, match="a training recipe needs a positive learning "
                       "rate and batch size and no negative weight decay or workers, got lr"):
        cp.Recipe(**bad)
