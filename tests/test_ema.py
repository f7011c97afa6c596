"""EMA of the weights: the average it should be, swapped in for sampling and back out."""
import torch

from framework.ema import EMA


def test_ema_follows_the_definition_and_swaps_back():
    m = torch.nn.Linear(3, 2)
    w0 = m.weight.detach().clone()
    ema = EMA(m, decay=0.9)
    ema.num_updates = 1000  # past the warm-up
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()
    expected = 0.9 * w0 + 0.1 * (w0 + 1.0)
    assert torch.allclose(ema.shadow[0], expected)
    live = m.weight.detach().clone()
    with ema.swapped():
        assert torch.allclose(m.weight, expected)
    assert torch.equal(m.weight, live)


def test_ema_state_round_trips():
    m = torch.nn.Linear(3, 2)
    a = EMA(m, 0.99)
    with torch.no_grad():
        m.weight.mul_(2)
    a.update()
    b = EMA(torch.nn.Linear(3, 2), 0.99)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow))


def test_ema_decay_warms_up():
    ema = EMA(torch.nn.Linear(1, 1), 0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == [0.1, 2 / 11, 3 / 12]
