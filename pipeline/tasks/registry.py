"""The built-in tasks: the DePT paper's 22, as the authors ran them (`src/tasks.py`, `train.py` and
`src/metrics.py` of github.com/ZhengxiangShi/DePT), plus the quickstart's synthetic tasks.

Deliberate departures from the authors' code (each also noted on its task below):
- WinoGrande renders option1 and option2 under the authors' slot names `option0:` / `option1:` (their code
  renders option1 twice).
- WSC marks spans whose case differs from the text ("the lawyer" at "The lawyer"), which the authors' exact-case
  regex leaves unmarked, and nests marks when the pronoun lies inside the noun span (`row_transforms.py`).
- SciTail reads hub `tsv_format` (premise, hypothesis, "entails"/"neutral") instead of `snli_format`.
- MRQA text is verbatim: the authors' T5 `pad_punctuation` (which splits "François" into "Fran ç ois") is not
  applied; SQuAD normalisation in the metric removes punctuation anyway. The headline metrics score against every
  gold answer (MRQA's official evaluation); the authors scored against the first gold answer only, which
  `squad_f1_first` / `squad_em_first` reproduce (the paper's MRQA numbers are that first-gold F1).
- MRQA selects checkpoints on exact match like the authors, but on `squad_em` (all golds) rather than their
  first-gold EM, so selection and the headline metric score the same way.
- MRQA reads the official `mrqa-workshop/mrqa` (one `subset` per source); the authors read per-source copies
  (lucadiliello/*) of the same data.

Hub datasets are namespaced ids (huggingface_hub 2.x refuses bare ids such as `glue`) at a pinned `revision`
where a commit of that repository is recorded in public code; the others follow `main` and are recorded as
unpinned (`Task.revision_pinned` is False). Sources of the pins:
- nyu-mll/glue bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c: public scripts loading GLUE configs from it, e.g.
  `hf://datasets/nyu-mll/glue@bcdcba79.../mrpc/train-00000-of-00001.parquet`.
- aps/super_glue 3de24cf8022e94f4ee4b9d55a6f539891524d646 and allenai/winogrande
  01e74176c63542e6b0bcb004dcdea22d94fb67b5: ramp-public/portallib, scripts/prepare_dataset.py (`wsc.fixed`,
  `cb`, `copa`, `wic`, `rte`; `winogrande_xl`).
- google-research-datasets/paws 161ece9501cf0a11f3e48bd356eaa82de46d6a09: public scripts reading
  `labeled_final/{train,test}-00000-of-00001.parquet` at it.
"""

from __future__ import annotations

from pipeline.errors import PipelineError, did_you_mean
from pipeline.tasks.row_transforms import mark_wsc_spans, strip_multirc_markup
from pipeline.tasks.stories import STORY_TASKS, story_task
from pipeline.tasks.synthetic import SYNTHETIC_TASKS, synthetic_task
from pipeline.tasks.targets import LabelWords, stsb_score, winogrande_answer
from pipeline.tasks.task import UNPINNED, Task

BINARY = ("0", "1")
THREE_WAY = ("0", "1", "2")
WSC_SPAN_COLUMNS = ("span1_text", "span1_index", "span2_text", "span2_index")

GLUE = ("nyu-mll/glue", "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c")
SUPER_GLUE = ("aps/super_glue", "3de24cf8022e94f4ee4b9d55a6f539891524d646")
WINOGRANDE = ("allenai/winogrande", "01e74176c63542e6b0bcb004dcdea22d94fb67b5")
PAWS = ("google-research-datasets/paws", "161ece9501cf0a11f3e48bd356eaa82de46d6a09")
# No commit of these repositories is recorded in public code we could check: they follow `main` (unpinned).
MRQA = ("mrqa-workshop/mrqa", UNPINNED)
YELP = ("fancyzhx/yelp_polarity", UNPINNED)
SCITAIL = ("allenai/scitail", UNPINNED)

# MRQA 2019 ships all in-domain sets in one hub dataset (config plain_text) with a `subset` column naming the
# source; we keep one subset. Its validation split is the in-domain dev set, which the large rule makes the test
# set (the authors' split_to_data_split maps test -> validation for these tasks).
MRQA_SUBSETS = {"nq": "NaturalQuestionsShort", "hotpotqa": "HotpotQA", "searchqa": "SearchQA", "newsqa": "NewsQA"}
# The authors' k-shot sampling buckets STS-B scores as "0" (<= 2.5) and "1" (above), train.py.
STSB_KSHOT_BOUNDARIES = (2.5,)
# The authors train Yelp-2 on `train_dataset.select(range(100000))` after holding out 1,000 rows (train.py).
YELP_TRAIN_ROWS = 100_000


def _classify(name, hub, hub_config, fields, split_rule, labels=BINARY, metrics=("accuracy",), **more) -> Task:
    hub_path, revision = hub
    return Task(
        name=name,
        hub_path=hub_path,
        hub_config=hub_config,
        revision=revision,
        input_fields=fields,
        label_column="label",
        labels=labels,
        metrics=metrics,
        split_rule=split_rule,
        kind="classification",
        **more,
    )


def _mrqa(name: str) -> Task:
    return Task(
        name=name,
        hub_path=MRQA[0],
        hub_config="plain_text",
        revision=MRQA[1],
        input_fields=("question", "context"),
        label_column="answers",
        labels=None,
        metrics=("squad_f1", "squad_em", "squad_f1_first", "squad_em_first"),
        selection_metric="squad_em",
        split_rule="large",
        kind="qa",
        row_filter=("subset", MRQA_SUBSETS[name]),
    )


PAPER_TASKS = [
    # GLUE
    _classify(
        "mnli",
        GLUE,
        "mnli",
        ("premise", "hypothesis"),
        "mnli",
        labels=THREE_WAY,
        # The shipped data names validation_matched plainly `validation.jsonl`.
        split_aliases=(("validation_matched", "validation"),),
    ),
    _classify("qqp", GLUE, "qqp", ("question1", "question2"), "large", metrics=("accuracy", "f1")),
    _classify("qnli", GLUE, "qnli", ("question", "sentence"), "large"),
    _classify("sst2", GLUE, "sst2", ("sentence",), "large"),
    Task(
        name="stsb",
        hub_path=GLUE[0],
        hub_config="stsb",
        revision=GLUE[1],
        input_fields=("sentence1", "sentence2"),
        label_column="label",
        labels=None,
        metrics=("pearson", "spearman"),
        split_rule="small",
        kind="regression",
        to_target=stsb_score,
        kshot_boundaries=STSB_KSHOT_BOUNDARIES,
    ),
    _classify("mrpc", GLUE, "mrpc", ("sentence1", "sentence2"), "small", metrics=("accuracy", "f1")),
    _classify("rte", GLUE, "rte", ("sentence1", "sentence2"), "small"),
    _classify("cola", GLUE, "cola", ("sentence",), "small", metrics=("matthews_corrcoef",)),
    # SuperGLUE
    _classify(
        "multirc",
        SUPER_GLUE,
        "multirc",
        ("question", "answer", "paragraph"),
        "small",
        metrics=("f1", "accuracy"),
        row_transform=strip_multirc_markup,
    ),
    _classify("boolq", SUPER_GLUE, "boolq", ("question", "passage"), "small"),
    _classify("wic", SUPER_GLUE, "wic", ("sentence1", "sentence2", "word"), "small"),
    # Spans marked case-insensitively and nested on overlap (the authors: exact case only); see row_transforms.
    _classify(
        "wsc", SUPER_GLUE, "wsc.fixed", ("text",), "small", row_transform=mark_wsc_spans, extra_columns=WSC_SPAN_COLUMNS
    ),
    # Accuracy is reported first (the paper's CB column); checkpoints are selected on macro-F1 as the authors'
    # metric_for_best_model (TASK_TO_METRICS["superglue-cb"][0] == "f1_multiclass") does.
    _classify(
        "cb",
        SUPER_GLUE,
        "cb",
        ("premise", "hypothesis"),
        "small",
        labels=THREE_WAY,
        metrics=("accuracy", "macro_f1"),
        selection_metric="macro_f1",
    ),
    # The authors' template: premise, choice1, choice2. Like theirs it leaves out `question` (cause/effect).
    _classify("copa", SUPER_GLUE, "copa", ("premise", "choice1", "choice2"), "small"),
    # MRQA: every gold answer scores the headline metrics; *_first are the authors' first-gold scores.
    *(_mrqa(name) for name in MRQA_SUBSETS),
    # Others. WinoGrande: the authors' slot names (option0, option1) over both options, not option1 twice.
    Task(
        name="winogrande",
        hub_path=WINOGRANDE[0],
        hub_config="winogrande_xl",
        revision=WINOGRANDE[1],
        input_fields=("sentence", "option1", "option2"),
        field_names=("sentence", "option0", "option1"),
        label_column="answer",
        labels=BINARY,
        metrics=("accuracy",),
        split_rule="large",
        kind="classification",
        to_target=winogrande_answer,
    ),
    # yelp_polarity has no validation split: its test split plays that part; the authors write "sentence:" and
    # train on the first 100,000 rows left after the 1,000 validation rows are held out.
    _classify(
        "yelp",
        YELP,
        "plain_text",
        ("text",),
        "large",
        field_names=("sentence",),
        eval_split="test",
        train_limit=YELP_TRAIN_ROWS,
    ),
    # tsv_format instead of the authors' snli_format: the same sentences under hub column names premise/hypothesis.
    _classify(
        "scitail",
        SCITAIL,
        "tsv_format",
        ("premise", "hypothesis"),
        "small",
        to_target=LabelWords.from_mapping({"entails": "0", "neutral": "1"}),
    ),
    # PAWS has labelled train/validation/test; the authors' code uses them as they are.
    _classify("paws", PAWS, "labeled_final", ("sentence1", "sentence2"), "original"),
]
TASKS: dict[str, Task] = {task.name: task for task in PAPER_TASKS}
TASKS.update({name: synthetic_task(name) for name in SYNTHETIC_TASKS})
TASKS.update({name: story_task(name) for name in STORY_TASKS})


def list_tasks(paper_only: bool = False) -> list[str]:
    """Names of the built-in tasks in registry order (the paper's 22 first, then the synthetic ones)."""
    return [task.name for task in PAPER_TASKS] if paper_only else list(TASKS)


def get_task(name: str) -> Task:
    """The built-in task called `name`."""
    if name not in TASKS:
        raise PipelineError(
            f"unknown task {name!r}{did_you_mean(name, TASKS)}: choose one of {', '.join(TASKS)} or define a "
            "custom task"
        )
    return TASKS[name]
