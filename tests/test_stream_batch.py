"""``stream_batch``: ``generate_batch``'s continuations as each ends, and a cancelled request's rows dropped."""

import torch

from microgpt.model.gpt import GPT
from microgpt.model.sampling import SampleRequest, generate_batch, stream_batch

END = 10


def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(END + 1, n_embd=16, n_head=2, n_layer=2, block_size=12)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
    return gpt.eval()


def requests() -> list[SampleRequest]:
    return [SampleRequest([END, 3], 6, 1.2, None, 0.9, torch.Generator().manual_seed(1)),
            SampleRequest([END], 9, 0.8, 4, None, torch.Generator().manual_seed(2)),
            SampleRequest([END, 1, 2, 5], 4, 1.0, None, None, torch.Generator().manual_seed(3))]


def test_each_continuation_arrives_once_as_it_ends_and_all_together_are_generate_batchs():
    gpt = model()
    expected = generate_batch(gpt, requests(), END)
    got = [[None] * r.count for r in requests()]
    for step, finished in enumerate(stream_batch(gpt, requests(), END)):
        for i, row, tokens in finished:
            assert got[i][row] is None
            got[i][row] = tokens
            # a row that ended at this step drew its end token now: its length tells the step
            assert len(tokens) == gpt.block_size or len(requests()[i].prompt) - 1 + len(tokens) == step
    assert got == expected


def test_a_cancelled_requests_rows_leave_and_the_others_draw_what_they_would_have():
    gpt = model()
    expected = generate_batch(gpt, requests(), END)
    cancelled, got = set(), [[None] * r.count for r in requests()]
    for step, finished in enumerate(stream_batch(gpt, requests(), END, cancelled=lambda: cancelled)):
        if step == 2:
            cancelled.add(1)
        for i, row, tokens in finished:
            got[i][row] = tokens
    assert got[0] == expected[0] and got[2] == expected[2]
    assert None in got[1] and all(t == e for t, e in zip(got[1], expected[1]) if t is not None)
