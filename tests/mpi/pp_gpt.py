"""A gpt.model.GPT as the pieces parallel.pipeline cuts into stages: GPT.pipeline_pieces
(parallel never imports gpt; the tests and bench/bench_pp.py reach it through this name)."""


def gpt_pieces(gpt):
    """-> (first, blocks, last, tied): what parallel.build_stage and PipelineExecutor take."""
    return gpt.pipeline_pieces()
