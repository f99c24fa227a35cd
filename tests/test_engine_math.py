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


def test_tiled_mlp_equals_the_plain_mlp_forward_and_backward():
    from elite_core.training import tile_mlps

    torch.manual_seed(0)
    plain, tiled = demo_model(seed=5), demo_model(seed=5)
    assert tile_mlps(tiled, shards=5) == plain.config.num_hidden_layers
    input_ids, labels = _batch(plain.config.vocab_size, seq=103)
    losses = []
    for model in (plain, tiled):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(plain.named_parameters(), tiled.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    # parameter names are untouched, so adapters saved from a tiled model load into a plain one
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in tiled.named_parameters()]


def test_rope_is_stretched_with_yarn_beyond_the_native_context():
    from elite_core.demo_model import demo_model_config
    from elite_core.model_loading import scale_rope

    config = demo_model_config()
    native = config.max_position_embeddings
    scale_rope(config, 4.0)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["original_max_position_embeddings"] == native
    assert config.max_position_embeddings == 4 * native
    unchanged = demo_model_config()
    scale_rope(unchanged, 1.0)
    assert unchanged.rope_parameters.get("rope_type", "default") == "default"
