"""The one sampling loop, streamed: ``stream_rows`` gives each continuation as it ends and drops a cancelled
request's rows; ``Drawing`` gives a kept continuation as soon as it is kept, the same ones ``generate`` keeps."""

import torch

from microgpt.model.gpt import GPT
from microgpt.model.sampling import Drawing, SampleRequest, generate, stream_rows

END = 10


def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(END + 1, n_embd=16, n_head=2, n_layer=2, block_size=12)
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3)
        gpt.lm_head.weight[END] = gpt.lm_head.weight[4]  # names of 0 to about 7 tokens, and some cut at 12
    return gpt.eval()


def requests() -> list[SampleRequest]:
    return [SampleRequest([END, 3], 6, 1.2, None, 0.9, torch.Generator().manual_seed(1)),
            SampleRequest([END], 9, 0.8, 4, None, torch.Generator().manual_seed(2)),
            SampleRequest([END, 1, 2, 5], 4, 1.0, None, None, torch.Generator().manual_seed(3))]


def alone(gpt: GPT) -> list[list[list[int]]]:
    """Each request drawn by itself: a seeded request draws the same whatever else is in its batch."""
    return [generate(gpt, [r], END)[0].tokens for r in requests()]


def test_each_continuation_arrives_once_as_it_ends_and_all_together_are_each_requests_draws_alone():
    gpt = model()
    expected = alone(gpt)
    got = [[None] * r.count for r in requests()]
    for step, finished in enumerate(stream_rows(gpt, requests(), END)):
        for i, row, tokens, logprob, ended in finished:
            assert got[i][row] is None
            got[i][row] = tokens
            # a row that ended at this step drew its end token now: its length tells the step
            prompt = len(requests()[i].prompt)
            assert ended == (len(tokens) < gpt.block_size)
            assert not ended or prompt - 1 + len(tokens) == step
            # the model's probability of the name given its prompt, its end included (a row that ended early)
            if ended and prompt + len(tokens) < gpt.block_size:
                sequence = torch.tensor([requests()[i].prompt + tokens + [END]])
                with torch.no_grad():
                    logp = torch.log_softmax(gpt(sequence)[0].float(), dim=-1)
                want = sum(logp[j - 1, sequence[0, j]].item() for j in range(prompt, sequence.size(1)))
                assert abs(logprob - want) < 1e-4
    assert got == expected


def test_a_cancelled_requests_rows_leave_and_the_others_draw_what_they_would_have():
    gpt = model()
    expected = alone(gpt)
    cancelled, got = set(), [[None] * r.count for r in requests()]
    for step, finished in enumerate(stream_rows(gpt, requests(), END, cancelled=lambda: cancelled)):
        if step == 2:
            cancelled.add(1)
        for i, row, tokens, _, _ in finished:
            got[i][row] = tokens
    assert got[0] == expected[0] and got[2] == expected[2]
    assert None in got[1] and all(t == e for t, e in zip(got[1], expected[1]) if t is not None)


def test_a_drawing_with_rejection_gives_out_what_generate_keeps_and_a_cancelled_one_stops_drawing():
    gpt = model()
    asks = lambda: [SampleRequest([END], 5, 1.0, generator=torch.Generator().manual_seed(4), lengths=(2, 4),
                                  unique=True),
                    SampleRequest([END, 3], 7, 1.0, generator=torch.Generator().manual_seed(5))]
    kept = [generate(gpt, [r], END)[0] for r in asks()]
    assert len(kept[0].tokens) == 5 and all(2 <= len(t) <= 4 for t in kept[0].tokens)
    assert len(set(map(tuple, kept[0].tokens))) == 5
    streamed = [{}, {}]
    for got in Drawing(gpt, asks(), END):
        for i, index, tokens, logprob in got:
            assert index not in streamed[i]
            streamed[i][index] = tokens, logprob
    for i in (0, 1):
        assert [streamed[i][k][0] for k in sorted(streamed[i])] == kept[i].tokens
        # alone or in a batch of another shape, the logits may differ in their last bits
        assert torch.allclose(torch.tensor([streamed[i][k][1] for k in sorted(streamed[i])]),
                              torch.tensor(kept[i].logprobs), atol=1e-5)
    cancelled = set()
    drawing = Drawing(gpt, asks(), END, cancelled=lambda: cancelled)
    for step, _ in enumerate(drawing):
        if step == 1:
            cancelled.add(0)
    assert drawing.found[0].tries == 0 and drawing.found[1].tokens == kept[1].tokens
