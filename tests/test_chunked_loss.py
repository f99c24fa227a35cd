import torch

from elite_core.demo_model import demo_model
from elite_core.training import chunked_target_loss


def _batch(vocab, seq=96, target=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq - target] = -100
    labels[1, -5:] = -100  # padding at the end of the second window
    return input_ids, labels


def test_chunked_loss_equals_the_models_own_loss_forward_and_backward():
    model = demo_model(seed=3)
    input_ids, labels = _batch(model.config.vocab_size)

    plain = model(input_ids=input_ids, labels=labels).loss
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    hidden = model.model(input_ids=input_ids).last_hidden_state
    chunked = chunked_target_loss(model.lm_head, hidden, labels, chunk_tokens=7)  # uneven chunks on purpose
    chunked.backward()

    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6), name


def test_no_labelled_positions_gives_zero_loss_with_a_graph():
    model = demo_model()
    input_ids, labels = _batch(model.config.vocab_size)
    labels[:] = -100
    hidden = model.model(input_ids=input_ids).last_hidden_state
    loss = chunked_target_loss(model.lm_head, hidden, labels)
    loss.backward()
    assert loss.item() == 0.0
