"""Two-branch coarse-to-fine fusion (CART, Fang et al., ACL 2025) against plain torch references."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cartlib.model.fusion import CoarseToFineFusion, CrossAttention, EncoderLayers, FusionMode

B, TQ, T, S, D, D_ENC, H = 3, 4, 6, 3, 32, 24, 4


def inputs(seed: int = 0, d_enc: int = D_ENC) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, TQ, D, generator=g)
    layers = torch.randn(S, B, T, d_enc, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False  # a padded query
    mask[2, 2:] = False
    return y, layers, mask


def fusion(mode: FusionMode, d_enc: int = D_ENC, seed: int = 0) -> CoarseToFineFusion:
    torch.manual_seed(seed)
    f = CoarseToFineFusion(d_model=D, d_enc=d_enc, n_enc_layers=S, n_heads=H, dropout=0.0, mode=mode)
    with torch.no_grad():  # non-uniform α and non-zero biases, so the tests see them
        for name, p in f.named_parameters():
            if name.endswith("bias") or "alpha" in name:
                p.normal_(0, 0.5)
    return f.eval()


def mha_like(attn: CrossAttention, d_kv: int) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention with the weights of ``attn``."""
    ref = nn.MultiheadAttention(D, H, kdim=d_kv, vdim=d_kv, batch_first=True).eval()
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        else:
            ref.q_proj_weight.copy_(attn.q_proj.weight)
            ref.k_proj_weight.copy_(attn.k_proj.weight)
            ref.v_proj_weight.copy_(attn.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    return ref


@pytest.mark.parametrize("mode", list(FusionMode))
def test_output_shapes(mode: FusionMode) -> None:
    y, layers, mask = inputs()
    f = fusion(mode)
    out = f(y, f.memory(layers, mask))
    assert out.shape == (B, TQ, D)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("d_enc", [D_ENC, D])  # separate and packed nn.MultiheadAttention weights
def test_fusion_off_is_plain_cross_attention_to_last_layer(d_enc: int) -> None:
    y, layers, mask = inputs(d_enc=d_enc)
    f = fusion(FusionMode.LAST_LAYER, d_enc=d_enc)
    ref = mha_like(f.last_attn, d_enc)
    expect, _ = ref(y, layers[-1], layers[-1], key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(f(y, f.memory(layers, mask)), expect, rtol=1e-5, atol=1e-5)


def test_fine_branch_is_alpha_mixture_of_per_layer_attentions() -> None:
    y, layers, mask = inputs(1)
    f = fusion(FusionMode.FINE)
    experts = f.fine
    alpha = torch.softmax(experts.alpha_logits, 0)  # (S, D)
    assert torch.allclose(alpha.sum(0), torch.ones(D))
    expect = torch.zeros(B, TQ, D)
    for i in range(S):  # Σ_i α_i ⊙ CrossAttn_i(Y, E_i), each an nn.MultiheadAttention
        attn = CrossAttention(d_model=D, d_kv=D_ENC, n_heads=H)
        with torch.no_grad():
            for proj, w, b in (
                (attn.q_proj, experts.q_weight, experts.q_bias),
                (attn.k_proj, experts.k_weight, experts.k_bias),
                (attn.v_proj, experts.v_weight, experts.v_bias),
                (attn.out_proj, experts.o_weight, experts.o_bias),
            ):
                proj.weight.copy_(w[i])
                proj.bias.copy_(b[i])
        out, _ = mha_like(attn, D_ENC)(y, layers[i], layers[i], key_padding_mask=~mask, need_weights=False)
        expect += alpha[i] * out
    torch.testing.assert_close(f(y, f.memory(layers, mask)), expect, rtol=1e-5, atol=1e-5)


def test_coarse_branch_is_gated_attention_to_projected_concat() -> None:
    y, layers, mask = inputs(2)
    f = fusion(FusionMode.COARSE)
    z = f.coarse_proj(torch.cat(list(layers), dim=-1))  # Z = W [E_1; ...; E_S] + b
    a, _ = mha_like(f.coarse_attn, D)(y, z, z, key_padding_mask=~mask, need_weights=False)
    expect = torch.sigmoid(f.coarse_gate(a)) * a
    torch.testing.assert_close(f(y, f.memory(layers, mask)), expect, rtol=1e-5, atol=1e-5)


def test_two_branch_is_coarse_plus_fine() -> None:
    y, layers, mask = inputs(3)
    both = fusion(FusionMode.TWO_BRANCH)
    coarse, fine = fusion(FusionMode.COARSE), fusion(FusionMode.FINE)
    coarse.load_state_dict({k: v for k, v in both.state_dict().items() if k.startswith("coarse")})
    fine.load_state_dict({k: v for k, v in both.state_dict().items() if k.startswith("fine")})
    expect = coarse(y, coarse.memory(layers, mask)) + fine(y, fine.memory(layers, mask))
    torch.testing.assert_close(both(y, both.memory(layers, mask)), expect, rtol=1e-5, atol=1e-5)


def test_alpha_and_both_branches_receive_gradient() -> None:
    y, layers, mask = inputs(4)
    f = fusion(FusionMode.TWO_BRANCH).train()
    layers.requires_grad_(True)
    f(y, f.memory(layers, mask)).square().mean().backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert f.fine.alpha_logits.grad.abs().min() > 0  # every layer and channel weight moves
    assert layers.grad[:, 0].abs().sum(-1).min() > 0  # every encoder layer feeds the output


def test_padding_is_ignored_and_positions_are_independent() -> None:
    y, layers, mask = inputs(5)
    f = fusion(FusionMode.TWO_BRANCH)
    out = f(y, f.memory(layers, mask))
    noisy = layers.clone()
    noisy[:, ~mask] = 1e3 * torch.randn_like(noisy[:, ~mask])  # garbage under the padding
    torch.testing.assert_close(f(y, f.memory(noisy, mask)), out, rtol=1e-5, atol=1e-5)
    # query positions (beams) share the memory but do not interact
    mem = f.memory(layers, mask)
    one_by_one = torch.cat([f(y[:, i : i + 1], mem) for i in range(TQ)], 1)
    torch.testing.assert_close(one_by_one, out, rtol=1e-5, atol=1e-5)


def test_wrong_layer_count_raises() -> None:
    _, layers, mask = inputs()
    with pytest.raises(ValueError, match="encoder layers"):
        fusion(FusionMode.TWO_BRANCH).memory(layers[:2], mask)


@pytest.mark.parametrize("mode", list(FusionMode))
def test_absorbed_form_equals_precomputed_keys_values_with_gradients(mode: FusionMode) -> None:
    """The training path (keys/values never formed) gives the memory path's outputs and gradients."""
    f = fusion(mode)
    y, layers, mask = inputs()
    y.requires_grad_(True)
    params = [p for p in f.parameters()] + [y]
    out_mem = f(y, f.memory(layers, mask))
    out_dir = f(y, EncoderLayers(layers, mask[:, None, None, :]))
    torch.testing.assert_close(out_dir, out_mem, atol=1e-5, rtol=1e-5)
    g_mem = torch.autograd.grad(out_mem.square().sum(), params, allow_unused=True)
    g_dir = torch.autograd.grad(out_dir.square().sum(), params, allow_unused=True)
    for (name, p), a, b in zip(list(f.named_parameters()) + [("y", y)], g_mem, g_dir):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b  # a key bias never changes the softmax: zero gradient
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
