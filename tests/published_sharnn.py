"""An independent implementation of the published SHA-RNN's eager computation, for comparison.

Written from the model contract in docs/model.md (the published code has no licence and is not copied): the same module
tree, parameter names and construction order as the published model, and its eager math: nn.LSTM,
explicit matmul-softmax attention with an additive -inf mask built in the model, and unfused Boom.
(The released code's `checkpoint` around attention and Boom is a plain call, so there is none
here either.) It shares no code with sharnn_fast, so agreement between the two means something.
The benchmarks use it as the baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _ln(d):
    return nn.LayerNorm(d, eps=1e-12)


class PublishedOverparam(nn.Module):
    def __init__(self, nhid):
        super().__init__()
        self.l1 = nn.Linear(nhid, 2 * nhid)
        self.nhid = nhid

    def forward(self, x):
        both = self.l1(x)
        c, f = both[..., :self.nhid], both[..., self.nhid:]
        return torch.sigmoid(f) * torch.tanh(c)


class PublishedAttention(nn.Module):
    def __init__(self, nhid, dropout):
        super().__init__()
        self.qs = nn.Parameter(torch.zeros(1, 1, nhid))
        self.ks = nn.Parameter(torch.zeros(1, 1, nhid))
        self.vs = nn.Parameter(torch.zeros(1, 1, nhid))
        self.qkvs = nn.Parameter(torch.zeros(1, 3, nhid))
        self.nhid = nhid
        self.drop = nn.Dropout(p=dropout) if dropout else None
        self.q = nn.Linear(nhid, nhid)
        self.qln = _ln(nhid)
        self.r_gate = nn.Parameter(torch.ones(1, 1, nhid))
        self.vq = PublishedOverparam(nhid)
        self.vq_collapsed = False

    def vq_collapse(self):
        collapsed = self.vq(torch.sigmoid(self.vs))
        self.vs.data = collapsed.data
        self.vq = None
        self.vq_collapsed = True

    def forward(self, query, key, value, attn_mask):
        qs, ks = torch.sigmoid(self.qs), torch.sigmoid(self.ks)
        if self.vq is not None:
            vs = self.vq(torch.sigmoid(self.vs))
        else:
            vs = self.vs
        query = self.qln(self.q(query).float())
        q, k, v = qs * query, ks * key, vs * value
        if self.drop is not None:
            q, v = self.drop(q), self.drop(v)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [B, T, d]
        scores = torch.matmul(q, k.transpose(1, 2).contiguous()) / math.sqrt(self.nhid)
        if attn_mask is not None:
            scores = scores + attn_mask.unsqueeze(0)
        weights = F.softmax(scores, dim=-1)
        if self.drop is not None:
            weights = self.drop(weights)
        mix = torch.matmul(weights, v)  # [B, Tq, d]
        return mix.transpose(0, 1), weights


class PublishedBoom(nn.Module):
    def __init__(self, d, F_, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d, F_)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x):
        z = self.linear1(x)
        a = z * torch.sigmoid(1.702 * z)
        if self.dropout is not None:
            a = self.dropout(a)
        d = x.shape[-1]
        a = torch.narrow(a, -1, 0, a.shape[-1] // d * d)
        return a.view(*a.shape[:-1], a.shape[-1] // d, d).sum(dim=-2)


class PublishedBlock(nn.Module):
    def __init__(self, d, F_, dropout, use_attn):
        super().__init__()
        self.attn = PublishedAttention(d, dropout) if use_attn else None
        self.ff = PublishedBoom(d, F_, dropout)
        self.lnstart, self.lnmid, self.lnmem = _ln(d), _ln(d), _ln(d)
        self.lnout, self.lnff, self.lnxff = _ln(d), _ln(d), _ln(d)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(input_size=d, hidden_size=d, batch_first=False)

    def forward(self, h, max_positions, attn_mask, mem=None, hidden=None):
        h = self.lnstart(h)
        x, new_hidden = self.rnn(h, hidden)
        h = self.drop(x).float()
        focus, new_mem = None, []
        if self.attn is not None:
            mh = self.lnmem(h)
            h = self.lnmid(h)
            bigh = torch.cat([mem, mh], dim=0) if mem is not None else mh
            new_mem = bigh[-max_positions:]
            x, focus = self.attn(h, bigh, bigh, attn_mask)
            h = h + self.drop(x)
        hr, x = self.lnff(h), self.lnxff(h)
        x = self.ff(x)
        h = hr + self.drop(x)
        return h, new_mem, new_hidden, focus


class PublishedSHARNN(nn.Module):
    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, dropouth=0.5,
                 dropouti=0.5, dropoute=0.1, wdrop=0, tie_weights=False, *, attn_every_layer=False):
        super().__init__()
        self.ninp, self.nhid, self.nlayers = ninp, nhid, nlayers
        self.num_max_positions = 5000
        self.drop = nn.Dropout(dropout)
        self.idrop = nn.Dropout(dropouti)
        self.hdrop = nn.Dropout(dropouth)
        self.blocks = nn.ModuleList()
        for idx in range(nlayers):
            use_attn = attn_every_layer or idx == nlayers - 2
            self.blocks.append(PublishedBlock(ninp, nhid, dropouth, use_attn))
        self.encoder = nn.Embedding(ntoken, ninp)
        self.decoder = nn.Linear(ninp, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.apply(self.init_weights)

    def init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.1 / math.sqrt(self.ninp))
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, x, hidden=None, mems=None, padding_mask=None, return_h=True):
        e = self.idrop(self.encoder(x))
        T = len(x)
        if mems is not None:
            keep = self.num_max_positions - T
            mems = [m[max(len(m) - keep, 0):] for m in mems]
        mask = torch.triu(torch.full((T, T), -float("inf"), device=e.device, dtype=e.dtype), diagonal=1)
        if mems:
            longest = max(len(m) for m in mems)
            mask = torch.cat([torch.zeros(T, longest, device=e.device, dtype=e.dtype), mask], dim=-1)
        h = e
        new_hidden, new_mems = [], []
        for idx, block in enumerate(self.blocks):
            mem = mems[idx] if mems else None
            hid = hidden[idx] if hidden else None
            h, m, nh, _ = block(h, self.num_max_positions, mask, mem=mem, hidden=hid)
            new_hidden.append(nh)
            new_mems.append(m)
        h = self.drop(h)
        if return_h:
            return h, new_hidden, new_mems, None, None
        return h, new_hidden, new_mems
