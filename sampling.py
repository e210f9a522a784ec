"""Images from a generator: seeded latents, the mapping to w, synthesis from w or per-layer styles,
batch by batch, on the CPU at the end so that callers can save or compare them."""
import torch


def seed_latents(seeds, z_dim):
    """One z per seed, drawn on the CPU so that a seed means the same z on every device."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def mapped(G, z, labels, truncation, device):
    """z (N, z_dim) and labels (indices, or (N, K) class weights) -> w (N, w_dim) on the CPU."""
    return G.mapping(z.to(device), labels.to(device) if labels is not None else None, truncation).cpu()


@torch.no_grad()
def synthesize(G, ws, noise_mode, batch, device):
    """Images (N, C, R, R) in [-1, 1] on the CPU from w (N, w_dim) or per-layer styles (N, num_ws, w_dim)."""
    if ws.dim() == 2:
        ws = ws[:, None].expand(-1, G.num_ws, -1)
    return torch.cat([G.synthesis(ws[i:i + batch].to(device), noise_mode).cpu() for i in range(0, len(ws), batch)])


@torch.no_grad()
def images_from_latents(G, z, labels, truncation, noise_mode, batch, device):
    """Images (N, C, R, R) in [-1, 1] for latents z, generated `batch` at a time."""
    out = []
    for i in range(0, len(z), batch):
        lab = labels[i:i + batch].to(device) if labels is not None else None
        out.append(G(z[i:i + batch].to(device), lab, truncation=truncation, noise_mode=noise_mode).cpu())
    return torch.cat(out)
