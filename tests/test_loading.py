"""Dataset loading: every schema from jsonl and parquet, column mapping, normalisation, world: paths,
streaming, and a DataError naming file, row and column for every kind of bad input."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest

from data.loading import DataError, DatasetSpec, load_dataset_for
from data.world import WorldConfig, write_world

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache for these throwaway files out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .jsonl or .parquet, chosen by the path's suffix."""
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path, schema: str, **spec) -> datasets.Dataset:
    return load_dataset_for(DatasetSpec(path=str(path), **spec), schema)


def assert_data_error(error: pytest.ExceptionInfo, path: Path, row: int | None, column: str | None) -> str:
    message = str(error.value)
    assert path.name in message, message
    if row is not None:
        assert f"row {row}" in message, message
    if column is not None:
        assert f"column '{column}'" in message, message
    return message


FORMATS = [".jsonl", ".parquet"]

# ---------------------------------------------------------------- good data, every schema


@pytest.mark.parametrize("suffix", FORMATS)
def test_text(tmp_path, suffix):
    path = write_rows(tmp_path / f"corpus{suffix}", [{"text": "Zorbi is teal."}, {"text": "23 plus 45 is 68."}])
    dataset = load(path, "text")
    assert dataset.column_names == ["text"]
    assert dataset["text"] == ["Zorbi is teal.", "23 plus 45 is 68."]


def test_txt_gives_one_row_per_non_empty_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \nsecond line\n")
    assert load(path, "text")["text"] == ["first line", "second line"]
    # The same file can serve as a prompt list through a column mapping.
    prompts = load(path, "prompts", columns={"prompt": "text"})
    assert prompts.column_names == ["prompt"] and prompts["prompt"] == ["first line", "second line"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_txt_corpus_of_paragraphs_is_read_line_by_line_with_a_warning(tmp_path, capsys, streaming):
    """A hard-wrapped book trained on shuffled line fragments without a word: each line of a .txt corpus is a
    document. Blank lines between one-line documents say nothing of the kind."""
    paragraph = "Once upon a time there was a fox\nwho lived at the edge of a forest\nnear the river.\n"
    book = tmp_path / "book.txt"
    book.write_text("\n".join([paragraph] * 3))
    assert len(list(load(book, "text", streaming=streaming))) == 9  # a row per line, as documented
    out = capsys.readouterr().out
    assert "warning: 3 of the 3 blocks of lines between blank lines" in out and "one document per line" in out
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("first document\n\nsecond document\n\nthird document\nfourth document\n")
    assert len(list(load(spaced, "text", streaming=streaming))) == 4
    # a prompt file is one prompt a line, however spaced
    assert len(list(load(book, "prompts", columns={"prompt": "text"}, streaming=streaming))) == 9
    assert "warning" not in capsys.readouterr().out


@pytest.mark.parametrize("streaming", [False, True])
def test_a_byte_order_mark_is_no_part_of_a_txt_files_first_line(tmp_path, streaming):
    """Notepad's "UTF-8" starts a file with a byte-order mark: it was kept, as '\ufeff', in the first document or
    prompt (CSV already read it as the mark it is)."""
    path = tmp_path / "notepad.txt"
    path.write_bytes("\ufeffline one\nline two\n".encode("utf-8"))
    assert [row["text"] for row in load(path, "text", streaming=streaming)] == ["line one", "line two"]
    gzipped = tmp_path / "notepad.txt.gz"
    gzipped.write_bytes(gzip.compress(path.read_bytes()))
    prompts = load(gzipped, "prompts", columns={"prompt": "text"}, streaming=streaming)
    assert [row["prompt"] for row in prompts] == ["line one", "line two"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_sft_messages_and_prompt_completion(tmp_path, suffix):
    chat = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]
    messages = load(write_rows(tmp_path / f"chat{suffix}", [{"messages": chat, "family": "arithmetic"}]), "sft")
    assert messages.column_names == ["messages", "prompt_turns", "family"]
    assert messages[0] == {"messages": chat, "prompt_turns": 0, "family": "arithmetic"}  # every reply trains

    pairs = write_rows(tmp_path / f"pc{suffix}", [{"prompt": "What is 2 plus 2?", "completion": "4."}])
    normalised = load(pairs, "sft")
    assert normalised.column_names == ["messages", "prompt_turns"]
    assert normalised[0] == {"messages": chat, "prompt_turns": 1}  # the first message is the prompt


@pytest.mark.parametrize("suffix", FORMATS)
def test_preferences_ranked_and_pairs(tmp_path, suffix):
    ranked_rows = [{"prompt": "p", "responses": ["best", "middle", "worst"], "gold_scores": [1.0, 0.5, 0.2],
                    "family": "fact"}]
    ranked = load(write_rows(tmp_path / f"ranked{suffix}", ranked_rows), "preferences")
    assert sorted(ranked.column_names) == ["family", "gold_scores", "prompt", "responses"]
    assert ranked[0] == ranked_rows[0]

    pairs = load(write_rows(tmp_path / f"pairs{suffix}", [{"prompt": "p", "chosen": "good", "rejected": "bad"}]),
                 "preferences")
    assert pairs.column_names == ["prompt", "responses"]
    assert pairs[0] == {"prompt": "p", "responses": ["good", "bad"]}


@pytest.mark.parametrize("suffix", FORMATS)
def test_prompts_with_column_mapping(tmp_path, suffix):
    rows = [{"question": "What colour is Zorbi?", "category": "fact", "id": 1},
            {"question": "What is 2 plus 2?", "category": "arithmetic", "id": 2}]
    dataset = load(write_rows(tmp_path / f"q{suffix}", rows), "prompts",
                   columns={"prompt": "question", "family": "category"})
    assert dataset.column_names == ["prompt", "family"]
    assert dataset[1] == {"prompt": "What is 2 plus 2?", "family": "arithmetic"}


@pytest.mark.parametrize("suffix", FORMATS)
def test_alpaca_rows_keep_their_input_after_the_instruction(tmp_path, suffix):
    """Mapped as prompt=instruction, an Alpaca row's `input` (the text to work on) was dropped without a word."""
    rows = [{"instruction": "Summarize the text.", "input": "Cats sleep a lot. They also purr.", "output": "Cats rest."},
            {"instruction": "Name a colour.", "input": "", "output": "Teal."}]
    dataset = load(write_rows(tmp_path / f"alpaca{suffix}", rows), "sft",
                   columns={"prompt": "instruction", "completion": "output"})
    assert [row["messages"][0]["content"] for row in dataset] == \
        ["Summarize the text.\n\nCats sleep a lot. They also purr.", "Name a colour."]
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "input": 3}])
    with pytest.raises(DataError) as error:
        load(bad, "sft")
    assert_data_error(error, bad, 1, "input")


@pytest.mark.parametrize("suffix", FORMATS)
def test_sharegpt_conversations_read_as_chat_messages(tmp_path, suffix):
    """ShareGPT's {from, value} turns (human, gpt, system) were refused as messages without role and content."""
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}]}]
    dataset = load(write_rows(tmp_path / f"sharegpt{suffix}", rows), "sft", columns={"messages": "conversations"})
    assert dataset[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello."}]
    bad = write_rows(tmp_path / "bad.jsonl", [{"messages": [{"from": "narrator", "value": "Once"}]}])
    with pytest.raises(DataError) as error:
        load(bad, "sft")
    assert_data_error(error, bad, 1, "messages")


def test_pairs_with_column_mapping(tmp_path):
    rows = [{"question": "q", "good": "yes", "bad": "no"}]
    dataset = load(write_rows(tmp_path / "pairs.jsonl", rows), "preferences",
                   columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert dataset[0] == {"prompt": "q", "responses": ["yes", "no"]}


def test_csv_columns_are_read_as_the_text_they_hold(tmp_path):
    """A spreadsheet of pairs: "4" stays the text 4, "NA" stays NA, quoted commas and line breaks survive."""
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"What is 2, plus 2?",4,"I think ""five""\nor so"\nSay NA.,NA,no\n')
    assert load(path, "preferences")[:] == {"prompt": ["What is 2, plus 2?", "Say NA."],
                                            "responses": [["4", 'I think "five"\nor so'], ["NA", "no"]]}
    completions = tmp_path / "sft.csv"
    completions.write_text("question,answer\nWhat is 2 plus 2?,04\n")
    assert load(completions, "sft", columns={"prompt": "question", "completion": "answer"})[0]["messages"][1] == \
        {"role": "assistant", "content": "04"}
    gap = tmp_path / "gap.csv"
    gap.write_text("prompt,chosen,rejected\nq1,a,b\nq2,,b\n")  # an empty cell: no reply, the pair says nothing
    assert len(load(gap, "preferences")) == 1
    blank = tmp_path / "blank.csv"
    blank.write_text("prompt,completion\nq1,a\n,b\n")
    with pytest.raises(DataError) as error:
        load(blank, "sft")
    assert_data_error(error, blank, row=2, column="prompt")
    excel = tmp_path / "excel.csv"  # a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    excel.write_bytes("prompt,completion\nq1,a\n".encode("utf-8-sig"))
    assert load(excel, "sft")[0]["messages"][0] == {"role": "user", "content": "q1"}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name, text, schema, line", [
    ("latin.jsonl", '{"text": "tea"}\n\n{"text": "café"}\n', "text", 3),
    ("latin.json", '[{"text": "tea"},\n {"text": "café"}]\n', "text", 2),
    ("latin.txt", "tea\n\ncafé au lait\n", "text", 3),
    ("latin.csv", "prompt,completion\nq,tea\nq,café\n", "sft", 3),
    ("latin.txt.gz", "tea\ncafé\n", "text", 2)])
def test_text_that_is_not_utf8_is_a_data_error_naming_the_file_and_line(tmp_path, streaming, name, text, schema,
                                                                         line):
    """Latin-1 text passed the reader and ended in a UnicodeDecodeError traceback from deep inside datasets; then
    it was named without its line (the reader's position is within the block it decoded)."""
    latin = tmp_path / name
    encoded = text.encode("latin-1")
    latin.write_bytes(gzip.compress(encoded) if name.endswith(".gz") else encoded)
    with pytest.raises(DataError, match=rf"data error in {latin}: not UTF-8 text \(line {line}, byte 0xe9: "):
        list(load(latin, schema, streaming=streaming))


def test_json_array_file_directory_and_max_rows(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    write_rows(folder / "a.jsonl", [{"prompt": f"a{i}"} for i in range(3)])
    write_rows(folder / "b.parquet", [{"prompt": f"b{i}"} for i in range(2)])
    (folder / "c.json").write_text(json.dumps([{"prompt": "c0"}]))
    assert load(folder, "prompts")["prompt"] == ["a0", "a1", "a2", "b0", "b1", "c0"]
    assert load(folder, "prompts", max_rows=4)["prompt"] == ["a0", "a1", "a2", "b0"]


def test_a_downloaded_dataset_directory_reads_only_the_split_asked_for(tmp_path):
    """A hub dataset saved to a folder keeps its splits in file names; reading them all put the test split into
    training."""
    folder = tmp_path / "ultrachat"
    (folder / "data").mkdir(parents=True)
    write_rows(folder / "data" / "train_sft-00000-of-00002.parquet", [{"prompt": "t0"}])
    write_rows(folder / "data" / "train_sft-00001-of-00002.parquet", [{"prompt": "t1"}])
    write_rows(folder / "data" / "test_sft-00000-of-00001.parquet", [{"prompt": "TEST"}])
    (folder / "README.md").write_text("# a dataset card\n")
    assert load(folder, "prompts", split="train_sft")["prompt"] == ["t0", "t1"]
    assert load(folder, "prompts", split="test_sft")["prompt"] == ["TEST"]
    with pytest.raises(DataError, match=r"column 'split': its files are named by split \(test_sft, train_sft\), "
                                        r"none by split 'train'"):
        load(folder, "prompts")
    prefs = tmp_path / "prefs"  # a collection's output: train.jsonl beside eval.jsonl
    prefs.mkdir()
    write_rows(prefs / "train.jsonl", [{"prompt": "kept"}])
    write_rows(prefs / "eval.jsonl", [{"prompt": "held out"}])
    assert load(prefs, "prompts")["prompt"] == ["kept"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_written_by_save_to_disk_is_read_and_validated(tmp_path, streaming):
    """Its dataset_info.json was read as the data (`column 'messages': missing ... found columns: citation,
    description, ...`) and its .arrow files left out. A DatasetDict gives the split asked for, as a downloaded
    dataset's files named by split do; its rows are checked like any other source's."""
    chats = [{"messages": [said("user", f"Hi {i}"), said("assistant", "Hello.")]} for i in range(3)]
    train, test = datasets.Dataset.from_list(chats), datasets.Dataset.from_list(chats[:1])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved_dd"))
    train.save_to_disk(str(tmp_path / "saved_ds"))
    for path, split, rows in [("saved_dd", "train", 3), ("saved_dd", "test", 1), ("saved_ds", "train", 3)]:
        dataset = load(tmp_path / path, "sft", split=split, streaming=streaming)
        assert [r["messages"][0]["content"] for r in dataset] == [f"Hi {i}" for i in range(rows)], (path, split)
    saved = sorted(p.name for p in (tmp_path / "saved_ds").iterdir())  # our maps cache elsewhere, not in there
    assert not [name for name in saved if name.startswith("cache-")], saved
    # a resume notices it changed, as it does a file's (source_fingerprints), unless it is streamed
    from data.loading import source_fingerprints

    before = source_fingerprints(data=DatasetSpec(path=str(tmp_path / "saved_ds")))
    datasets.Dataset.from_list(chats[1:]).save_to_disk(str(tmp_path / "saved_ds"))
    after = source_fingerprints(data=DatasetSpec(path=str(tmp_path / "saved_ds")))
    assert set(before) == {"data"} and before != after
    assert source_fingerprints(data=DatasetSpec(path=str(tmp_path / "saved_ds"), streaming=True)) == {}
    with pytest.raises(DataError, match=r"saved_dd, column 'split': a DatasetDict saved with save_to_disk, with "
                                        r"splits train, test, none named 'validation'"):
        load(tmp_path / "saved_dd", "sft", split="validation", streaming=streaming)
    bad = chats[:1] + [{"messages": [said("user", "Hi"), said("assistant", "")]}]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError) as error:
        list(load(tmp_path / "bad", "sft", streaming=streaming))
    assert_data_error(error, tmp_path / "bad", row=2, column="messages")
    # one inside a folder of data files: its .json files are no data
    outer = tmp_path / "outer"
    train.save_to_disk(str(outer / "part"))
    write_rows(outer / "more.jsonl", chats)
    with pytest.raises(DataError, match=r"outer/part: a dataset written by save_to_disk, inside .*outer: give its "
                                        r"directory as the path"):
        load(outer, "sft", streaming=streaming)


def test_world_paths(tmp_path):
    config = WorldConfig(n_entities=12, corpus_chars=5000, sft_examples=30, sft_eval_examples=5, pref_prompts=10,
                         ppo_prompts=10, eval_prompts=10)
    world_dir = write_world(tmp_path / "world", config)
    for split, schema, columns in [("pretrain", "text", ["text"]),
                                   ("sft_train", "sft", ["messages", "prompt_turns", "family"]),
                                   ("sft_eval", "sft", ["messages", "prompt_turns", "family"]),
                                   ("prefs_static", "preferences", ["prompt", "responses", "family", "gold_scores"]),
                                   ("pref_prompts", "prompts", ["prompt", "family"]),
                                   ("ppo_prompts", "prompts", ["prompt", "family"]),
                                   ("eval_prompts", "prompts", ["prompt", "family"])]:
        dataset = load_dataset_for(DatasetSpec(path=f"world:{split}"), schema, world_dir=world_dir)
        lines = (world_dir / f"{split}.jsonl").read_text().splitlines()
        assert len(dataset) == len(lines), split
        assert sorted(dataset.column_names) == sorted(columns), split
    with pytest.raises(DataError, match="no world_dir"):
        load_dataset_for(DatasetSpec(path="world:sft_train"), "sft")
    with pytest.raises(DataError, match=r"world:nope: the world in .* has no split 'nope' \(its splits: eval_"):
        load_dataset_for(DatasetSpec(path="world:nope"), "prompts", world_dir=world_dir)


def test_streaming_is_lazy_and_validates_each_row(tmp_path):
    rows = [{"text": f"line {i}"} for i in range(5)] + [{"text": 7}]
    path = write_rows(tmp_path / "big.jsonl", rows)
    stream = load(path, "text", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [r["text"] for r in stream.take(3)] == ["line 0", "line 1", "line 2"]
    with pytest.raises(DataError) as error:
        list(stream)
    assert_data_error(error, path, row=6, column="text")
    assert [r["text"] for r in load(path, "text", streaming=True, max_rows=2)] == ["line 0", "line 1"]


def test_streaming_checks_the_first_row_up_front(tmp_path):
    path = write_rows(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError) as error:
        load(path, "preferences", streaming=True)  # no iteration needed
    assert_data_error(error, path, row=1, column="rejected")


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_row_after_blank_lines_is_named_by_its_line_in_the_file(tmp_path, streaming):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = tmp_path / "prefs.jsonl"
    path.write_text(f"{good}\n\n{good}\n\n{json.dumps({'prompt': 'p', 'chosen': 'a'})}\n")  # record 3, line 5
    with pytest.raises(DataError) as error:
        list(load(path, "preferences", streaming=streaming))
    assert_data_error(error, path, row=5, column="rejected")


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_null_cell_names_its_row_and_column(tmp_path, suffix):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}]
    path = write_rows(tmp_path / f"prefs{suffix}", rows)
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    message = assert_data_error(error, path, row=2, column="rejected")
    assert "null in this row" in message and "'prompt' + 'chosen' + 'rejected'" in message


@pytest.mark.parametrize("suffix", FORMATS)
def test_column_absent_from_the_whole_file(tmp_path, suffix):
    path = write_rows(tmp_path / f"sft{suffix}", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError) as error:
        load(path, "sft")
    assert_data_error(error, path, row=1, column="completion")


@pytest.mark.parametrize("suffix", FORMATS)
def test_mapped_source_column_not_found(tmp_path, suffix):
    path = write_rows(tmp_path / f"q{suffix}", [{"text": "hello"}])
    with pytest.raises(DataError) as error:
        load(path, "prompts", columns={"prompt": "question"})
    message = assert_data_error(error, path, row=1, column="question")
    assert "found columns: text" in message


@pytest.mark.parametrize("suffix", FORMATS)
def test_responses_is_a_string(tmp_path, suffix):
    path = write_rows(tmp_path / f"ranked{suffix}", [{"prompt": "p", "responses": "just one string"}])
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    message = assert_data_error(error, path, row=1, column="responses")
    assert "expected a list" in message and "got str" in message


def test_responses_type_changes_midway(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a", "b"]},
            {"prompt": "p", "responses": "a"}]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert_data_error(error, path, row=3, column="responses")


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("messages", ["hello", [{"role": "user", "text": "hi"}], [{"role": "user", "content": "hi"}]],
                         ids=["string", "no-content", "no-assistant-turn"])
def test_messages_not_a_list_of_role_content_dicts(tmp_path, suffix, messages):
    path = write_rows(tmp_path / f"chat{suffix}", [{"messages": messages}])
    with pytest.raises(DataError) as error:
        load(path, "sft")
    assert "expected a list of {'role', 'content'} messages" in assert_data_error(error, path, 1, "messages")


@pytest.mark.parametrize("suffix", FORMATS)
def test_fewer_than_two_responses(tmp_path, suffix):
    rows = [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q", "responses": ["only"]}]
    path = write_rows(tmp_path / f"ranked{suffix}", rows)
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert "got 1 response(s)" in assert_data_error(error, path, row=2, column="responses")


@pytest.mark.parametrize("suffix", FORMATS)
def test_duplicate_responses(tmp_path, suffix):
    rows = [{"prompt": "p", "responses": ["a", "b", "a"]}]
    path = write_rows(tmp_path / f"ranked{suffix}", rows)
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert "duplicate response 'a'" in assert_data_error(error, path, row=1, column="responses")


def test_pairs_that_say_nothing_are_skipped_with_a_count(tmp_path, capsys):
    """Equal replies, or an empty one, carry no preference; public pair sets hold a few, and one such row used to
    stop the whole dataset. A ranked list with duplicates is still an error (above)."""
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"},
                                                 {"prompt": "q", "chosen": "good", "rejected": "bad"},
                                                 {"prompt": "r", "chosen": "fine", "rejected": "  "},
                                                 {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",  # hh, one empty
                                                  "rejected": "\n\nHuman: Hi\n\nAssistant:"}])
    assert load(path, "preferences")["responses"] == [["good", "bad"]]
    assert "3 of 4 preference rows skipped: their replies are equal, one is empty" in capsys.readouterr().out
    only = write_rows(tmp_path / "none.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match="every preference row said nothing: equal replies, an empty one"):
        load(only, "preferences")
    wrong_type = write_rows(tmp_path / "typed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": 3}])
    with pytest.raises(DataError) as error:
        load(wrong_type, "preferences")
    assert_data_error(error, wrong_type, row=1, column="rejected")


def test_hh_transcripts_that_go_on_past_their_reply_are_skipped_with_a_count(tmp_path, capsys):
    """A side that ends on a Human turn was accepted, its reply running on into that turn ('5.\n\nHuman: thanks,
    now tell me a joke' scored as the reply), with or without a prompt column; the chat form of it is refused."""
    asked = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"
    goes_on = asked + " 5.\n\nHuman: thanks, now tell me a joke"
    path = write_rows(tmp_path / "hh.jsonl", [
        {"chosen": goes_on, "rejected": asked + " 6."},
        {"chosen": asked + " 5.\n\nHuman: thanks", "rejected": asked + " 6.\n\nHuman: why?"},  # both sides
        {"prompt": asked, "chosen": goes_on, "rejected": asked + " 6."},
        {"prompt": "What is 2 plus 3?", "chosen": asked + " 6.", "rejected": goes_on},
        {"chosen": asked + " 5.", "rejected": asked + " 6."}])
    assert load(path, "preferences")["responses"] == [["5.", "6."]]
    assert "4 of 5 preference rows skipped" in capsys.readouterr().out
    assert [row["responses"] for row in load(path, "preferences", streaming=True)] == [["5.", "6."]]


def test_a_reply_beside_an_hh_prompt_that_goes_on_into_a_human_turn_is_skipped_with_a_count(tmp_path, capsys):
    """Beside a prompt in hh-rlhf's form, a reply-only side with a Human turn in it goes on past its reply, as the
    same pair written as transcripts does (above); it was accepted, the turn kept in the reply. Beside a plain
    prompt such a reply stays as it is."""
    asked = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"
    path = write_rows(tmp_path / "hh.jsonl", [
        {"prompt": asked, "chosen": " 5.\n\nHuman: thanks, now tell me a joke", "rejected": " 6."},
        {"prompt": asked, "chosen": " 5.", "rejected": " 6.\n\nHuman: why?"},
        {"prompt": asked, "chosen": " 5.", "rejected": " 6."},
        {"prompt": "Write a dialogue.", "chosen": "Hi.\n\nHuman: hello", "rejected": "No."}])
    expected = [["5.", "6."], ["Hi.\n\nHuman: hello", "No."]]
    assert load(path, "preferences")["responses"] == expected
    assert "2 of 4 preference rows skipped" in capsys.readouterr().out
    assert [row["responses"] for row in load(path, "preferences", streaming=True)] == expected


def test_hh_transcripts_that_part_in_their_first_turn_are_skipped_as_later_partings_are(tmp_path, capsys):
    """Transcripts that differ in their first Human turn share no reply opening: that stopped the whole run with
    'column prompt: missing', while parting at a later turn was skipped. Strings that are no transcripts still stop
    it."""
    rows = [{"chosen": "\n\nHuman: Q?\n\nAssistant: A.", "rejected": "\n\nHuman: Q?\n\nAssistant: B."},
            {"chosen": "\n\nHuman: Hi there\n\nAssistant: x\n\nHuman: Q\n\nAssistant: good",
             "rejected": "\n\nHuman: Hello\n\nAssistant: x\n\nHuman: Q\n\nAssistant: bad"},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: x\n\nHuman: Q\n\nAssistant: good",
             "rejected": "\n\nHuman: Hi\n\nAssistant: y\n\nHuman: Q\n\nAssistant: bad"}]
    path = write_rows(tmp_path / "hh.jsonl", rows)
    assert load(path, "preferences")["responses"] == [["A.", "B."]]
    assert "2 of 3 preference rows skipped" in capsys.readouterr().out
    half = write_rows(tmp_path / "half.jsonl", [rows[0], {"chosen": rows[1]["chosen"], "rejected": "bad"}])
    with pytest.raises(DataError) as error:
        load(half, "preferences")
    assert "must be hh-rlhf transcripts" in assert_data_error(error, half, row=2, column="prompt")


def test_max_rows_counts_the_rows_read_alike_in_memory_and_streaming(tmp_path):
    """In memory the cap counted raw lines of one file but kept rows of the next; streaming counted kept rows."""
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("a1\n\n\n\na2\na3\n")
    (folder / "b.txt").write_text("b1\nb2\nb3\nb4\n")
    in_memory = [r["text"] for r in load(folder, "text", max_rows=6)]
    streamed = [r["text"] for r in load(folder, "text", max_rows=6, streaming=True)]
    assert in_memory == streamed == ["a1", "a2", "a3"]


def test_an_hh_transcript_prompt_trains_sft_on_the_turns_every_stage_prompts_with(tmp_path):
    """A prompt + completion row whose prompt is an hh-rlhf transcript became one user turn quoting it, while
    evaluation and PPO prompt the model with its turns."""
    transcript = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 plus 2?\n\nAssistant:"
    path = write_rows(tmp_path / "hh_sft.jsonl", [{"prompt": transcript, "completion": " Four."},
                                                  {"prompt": "What is 3 plus 3?", "completion": "Six."}])
    rows = load(path, "sft")
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "What is 2 plus 2?"},
                                   {"role": "assistant", "content": " Four."}]
    assert rows[1]["messages"] == [{"role": "user", "content": "What is 3 plus 3?"},
                                   {"role": "assistant", "content": "Six."}]
    assert rows["prompt_turns"] == [3, 1]  # the transcript's reply "Hello!" is the prompt's, not trained
    # an empty reply inside the prompt (hh-rlhf has some) is context, not trained: no reason to refuse the file
    gap = "\n\nHuman: Hi\n\nAssistant:\n\nHuman: Hello?\n\nAssistant:"
    path = write_rows(tmp_path / "hh_gap.jsonl", [{"prompt": gap, "completion": "Hi."}])
    assert load(path, "sft")["prompt_turns"] == [3]


def test_raw_hh_rlhf_transcripts_become_prompt_and_replies(tmp_path):
    """Anthropic/hh-rlhf has only two whole transcripts per row: the shared conversation is the prompt, read by
    the models as its turns, not as one user message quoting them."""
    from pipeline.tokenizer import prompt_messages

    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    path = write_rows(tmp_path / "hh.jsonl", [{"chosen": shared + " Paris.", "rejected": shared + " Rome."}])
    row = load(path, "preferences")[0]
    assert row["prompt"] == shared and row["responses"] == ["Paris.", "Rome."]
    assert prompt_messages(row["prompt"]) == [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello!"},
                                              {"role": "user", "content": "Capital of France?"}]
    assert prompt_messages("What is 2 plus 2?") == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert prompt_messages("Human: hi Assistant:") == [{"role": "user", "content": "Human: hi Assistant:"}]
    quoting = write_rows(tmp_path / "quote.jsonl", [{"chosen": shared + " Say '\n\nAssistant: x'.",
                                                     "rejected": shared + " No."}])  # a reply quoting the marker
    assert load(quoting, "preferences")[0]["responses"] == ["Say '\n\nAssistant: x'.", "No."]
    mismatched = write_rows(tmp_path / "other.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as error:
        load(mismatched, "preferences")
    assert_data_error(error, mismatched, row=1, column="prompt")
    missing = write_rows(tmp_path / "half.jsonl", [{"prompt": "p", "chosen": "a"}])  # issue #5's acceptance line
    with pytest.raises(DataError) as error:
        load(missing, "preferences")
    assert_data_error(error, missing, row=1, column="rejected")


def test_replies_are_read_as_the_rm_scores_them(tmp_path):
    """Each side may repeat a prompt column before its reply (an hh-rlhf copy with a prompt column): the reply is
    the rest. Replies lose surrounding whitespace, as every stage scores them (decoded and stripped)."""
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    path = write_rows(tmp_path / "hh.jsonl", [
        {"prompt": shared, "chosen": shared + " Paris.", "rejected": shared + " Rome."},
        {"prompt": shared.lstrip(), "chosen": shared + " Paris.", "rejected": "Rome."},  # TRL strips its prompts
        {"prompt": "Capital of France?", "chosen": shared + " Paris.", "rejected": shared + " Rome."},  # last turn
        {"prompt": "Q?", "chosen": " Paris.\n", "rejected": "Rome. "},
        {"prompt": "Q?", "responses": [" Paris.", "Rome.\n"]}])
    rows = load(path, "preferences")
    assert [r["responses"] for r in rows] == [["Paris.", "Rome."]] * 5
    assert rows[0]["prompt"] == shared
    # a reply that is a sample transcript of another conversation, or that merely starts as the prompt does, stays
    other = write_rows(tmp_path / "other.jsonl", [
        {"prompt": "Write a chat.", "chosen": "Human: Hi\n\nAssistant: Hello!", "rejected": "No."},
        {"prompt": "Hello", "chosen": "Hello! How can I help?", "rejected": "Hello."}])
    assert [r["responses"] for r in load(other, "preferences")] == [
        ["Human: Hi\n\nAssistant: Hello!", "No."], ["Hello! How can I help?", "Hello."]]


def test_a_column_of_mixed_json_types_is_checked_as_written(tmp_path):
    """datasets reads a column of mixed types by parsing every string that looks like JSON: the completion "4"
    would become 4. Each row is checked as the file writes it, so the row named is the one with the wrong type."""
    rows = [{"prompt": "1+2?", "completion": 3}, {"prompt": "2+2?", "completion": "4"},
            {"prompt": "4+5?", "completion": "9"}]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as error:
        load(path, "sft")
    assert "got int 3" in assert_data_error(error, path, row=1, column="completion")
    strings = write_rows(tmp_path / "strings.jsonl", rows[1:])
    assert [r["messages"][-1]["content"] for r in load(strings, "sft")] == ["4", "9"]
    # a prompt as text here, as messages there, reads as written: "3" stays the string it is
    both = write_rows(tmp_path / "both.jsonl", [{"prompt": "3"}, {"prompt": [{"role": "user", "content": "4"}]}])
    assert load(both, "prompts")["prompt"][0] == "3"
    # a column the schema does not read may mix what it likes; a parquet file is not JSON text to scan
    ids = write_rows(tmp_path / "ids.jsonl", [{**row, "id": i} for row, i in zip(rows[1:], (1, "8"))])
    assert len(load(ids, "sft")) == 2
    datasets.Dataset.from_list([{"prompt": "1+2?", "completion": "3"}]).to_parquet(str(tmp_path / "p.parquet"))
    assert len(load(tmp_path / "p.parquet", "sft")) == 1


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("reply", ["02", "4.", "1e3", "null"])
def test_a_reply_that_looks_like_json_beside_a_chat_stays_the_text_it_is(tmp_path, streaming, reply):
    """A completion written as text ("02") in one row and as messages in the next: datasets' lenient parsing made
    it 2 and the row was refused ("got int 2"); streamed, it still was after the file was read as written."""
    chat = [{"role": "assistant", "content": "Hello."}]
    path = write_rows(tmp_path / "mixed.jsonl", [{"prompt": "Q?", "completion": reply},
                                                  {"prompt": "Hi", "completion": chat}])
    assert [r["messages"][-1]["content"] for r in load(path, "sft", streaming=streaming)] == [reply, "Hello."]
    wrong = write_rows(tmp_path / "wrong.jsonl", [{"prompt": "Hi", "completion": chat},
                                                  {"prompt": "Q?", "completion": 3}])
    with pytest.raises(DataError) as error:
        list(load(wrong, "sft", streaming=streaming))
    assert "got int 3" in assert_data_error(error, wrong, row=2, column="completion")


@pytest.mark.parametrize("rows, row, column, problem", [
    ([{"prompt": "a", "responses": ["3", "4"]}, {"prompt": "b", "responses": ["x", "y"]},
      {"prompt": "c", "responses": [5, "y"]}], 3, "responses", "response 0 is int 5"),
    ([{"prompt": "a", "responses": ["x", "y"], "ratings": ["2", "1"]},
      {"prompt": "b", "responses": ["x", "y"], "ratings": [1, 2]}], 1, "ratings", "got list ['2', '1']"),
    ([{"prompt": "a", "responses": ["x", "y"], "gold_scores": [1, 2]},
      {"prompt": "b", "responses": ["x", "y"], "gold_scores": ["1", "2"]}], 2, "gold_scores", "got list ['1', '2']"),
], ids=["responses", "ratings", "gold_scores"])
def test_a_list_column_of_mixed_item_types_names_the_row_with_the_wrong_type(tmp_path, rows, row, column, problem):
    """datasets parses the string items of such a list as JSON too: the valid replies "3", "4" became numbers and
    their row was named, and the ratings "2", "1" were read as numbers without a word."""
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert problem in assert_data_error(error, path, row=row, column=column)


USER = {"role": "user", "content": "Capital of France?"}


def said(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.mark.parametrize("suffix", FORMATS)
def test_conversational_pairs_as_ultrafeedback_and_trl_write_them(tmp_path, suffix):
    """UltraFeedback-binarized (a prompt string, each side the whole chat), TRL's explicit prompt (each side the
    reply alone) and TRL's implicit prompt (each side the whole chat, no prompt column) give one ranked pair."""
    ultrafeedback = {"prompt": USER["content"], "chosen": [USER, said("assistant", "Paris.")],
                     "rejected": [USER, said("assistant", "Rome.")], "score_chosen": 9.0, "score_rejected": 2.0}
    explicit = {"prompt": [USER], "chosen": [said("assistant", "Paris.")], "rejected": [said("assistant", "Rome.")]}
    implicit = {"chosen": [USER, said("assistant", "Paris.")], "rejected": [USER, said("assistant", "Rome.")]}
    for name, row in {"uf": ultrafeedback, "explicit": explicit, "implicit": implicit}.items():
        dataset = load(write_rows(tmp_path / f"{name}{suffix}", [row]), "preferences")
        assert dataset.column_names == ["prompt", "responses"], name
        assert dataset[0] == {"prompt": "Capital of France?", "responses": ["Paris.", "Rome."]}, name


def test_a_conversational_prompt_with_earlier_turns_travels_as_the_turns_it_holds(tmp_path):
    from pipeline.tokenizer import prompt_messages

    before = [said("user", "Hi"), said("assistant", "Hello!"), USER]
    rows = [{"chosen": [*before, said("assistant", "Paris.")], "rejected": [*before, said("assistant", "Rome.")]}]
    pair = load(write_rows(tmp_path / "multi.jsonl", rows), "preferences")[0]
    assert prompt_messages(pair["prompt"]) == before and pair["responses"] == ["Paris.", "Rome."]
    # a prompt column that holds only the last user message (each side the whole chat) keeps the earlier turns
    with_last = [{"prompt": USER["content"], **rows[0]}]
    assert load(write_rows(tmp_path / "last.jsonl", with_last), "preferences")[0] == pair
    prompts = load(write_rows(tmp_path / "prompts.jsonl", [{"prompt": before}, {"prompt": "Plain?"}]), "prompts")
    assert [prompt_messages(p) for p in prompts["prompt"]] == [before, [said("user", "Plain?")]]
    sft = load(write_rows(tmp_path / "pc.jsonl", [{"prompt": before, "completion": [said("assistant", "Paris.")]}]),
               "sft")
    assert sft[0]["messages"] == [*before, said("assistant", "Paris.")] and sft[0]["prompt_turns"] == 3
    # only the completion is trained: one without a reply of its own would train nothing
    no_reply = write_rows(tmp_path / "no_reply.jsonl", [{"prompt": before, "completion": [said("user", "Thanks.")]}])
    with pytest.raises(DataError) as error:
        load(no_reply, "sft")
    assert "at least one assistant turn; found none" in assert_data_error(error, no_reply, 1, "completion")


SKY = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What colour is the sky?\n\nAssistant:"  # an hh-rlhf prompt


def test_hh_transcript_sides_beside_a_prompt_column_are_read_as_chat_sides_are(tmp_path):
    """Transcript sides were cut only beside a string prompt of their own turns: beside the last user message their
    earlier turns were dropped (a chat side's are the prompt), beside a chat prompt they were not cut at all."""
    from pipeline.tokenizer import prompt_messages

    before = [said("user", "Hi"), said("assistant", "Hello!"), said("user", "What colour is the sky?")]
    chat = {"chosen": [*before, said("assistant", "Blue.")], "rejected": [*before, said("assistant", "Green.")]}
    transcripts = {"chosen": SKY + " Blue.", "rejected": SKY + " Green."}
    rows = [{"prompt": "What colour is the sky?", **chat}, {"prompt": "What colour is the sky?", **transcripts},
            {"prompt": before, **transcripts}, {"prompt": [before[-1]], **transcripts}]
    pairs = load(write_rows(tmp_path / "pairs.jsonl", rows), "preferences")
    assert [prompt_messages(prompt) for prompt in pairs["prompt"]] == [before] * 4
    assert pairs["responses"] == [["Blue.", "Green."]] * 4


@pytest.mark.parametrize("row, column, words", [
    ({"prompt": "What colour is the sky?", "chosen": SKY + " Blue.",
      "rejected": "\n\nHuman: Hey\n\nAssistant: Yo\n\nHuman: What colour is the sky?\n\nAssistant: Green."},
     "rejected", "differ from those of 'chosen'"),
    ({"prompt": "Something else?", "chosen": SKY + " Blue.", "rejected": "Green."}, "chosen",
     "neither the row's 'prompt' nor end with it"),
    ({"prompt": [said("user", "Hi"), said("assistant", "Hey"), said("user", "What colour is the sky?")],
      "chosen": "Blue.", "rejected": SKY + " Green."}, "rejected", "neither the row's 'prompt' nor end with it"),
], ids=["sides-disagree", "side-disagrees-with-prompt", "side-disagrees-with-chat-prompt"])
def test_hh_transcript_sides_that_do_not_hold_the_prompt_are_refused_as_chat_sides_are(tmp_path, row, column, words):
    """They were kept whole as replies (or beside the last user message, their differing earlier turns dropped);
    the same pair as chats is refused."""
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}, row])
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert words in assert_data_error(error, path, row=2, column=column)


def test_an_hh_prompt_without_its_closing_assistant_turn_is_read_as_its_turns(tmp_path):
    """"\n\nHuman: Q?" (an hh-rlhf copy that cut off the reply's opening) was one user message quoting the markers,
    and transcript sides beside it were not cut; a prompt that merely starts with "Human:" stays as it is."""
    from pipeline.tokenizer import prompt_messages

    turns = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Q?"
    pairs = load(write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": "\n\nHuman: Q?", "chosen": "\n\nHuman: Q?\n\nAssistant: A.",
         "rejected": "\n\nHuman: Q?\n\nAssistant: B."},
        {"prompt": turns, "chosen": "A.", "rejected": "B."}]), "preferences")
    assert [prompt_messages(prompt) for prompt in pairs["prompt"]] == [
        [said("user", "Q?")], [said("user", "Hi"), said("assistant", "Hello"), said("user", "Q?")]]
    assert pairs["responses"] == [["A.", "B."]] * 2
    prompts = load(write_rows(tmp_path / "prompts.jsonl", [{"prompt": turns}, {"prompt": "Human: Q?"}]), "prompts")
    assert prompts["prompt"] == [turns + "\n\nAssistant:", "Human: Q?"]
    sft = load(write_rows(tmp_path / "sft.jsonl", [{"prompt": turns, "completion": "A."}]), "sft")[0]
    assert sft["messages"][-2:] == [said("user", "Q?"), said("assistant", "A.")] and sft["prompt_turns"] == 3


@pytest.mark.parametrize("row, column, words", [
    ({"chosen": [USER, said("assistant", "Paris.")], "rejected": [said("user", "Other?"), said("assistant", "No.")]},
     "rejected", "differ from those of 'chosen'"),
    ({"prompt": "Something else?", "chosen": [USER, said("assistant", "Paris.")], "rejected": "Rome."},
     "chosen", "neither the row's 'prompt' nor end with it"),
    ({"prompt": "Q?", "chosen": [USER], "rejected": "Rome."}, "chosen", "last message to be the assistant's"),
    ({"prompt": [said("system", "Be brief."), USER], "chosen": "Paris.", "rejected": "Rome."}, "prompt",
     "system message"),
    ({"prompt": [USER, said("assistant", "Hm.")], "chosen": "Paris.", "rejected": "Rome."}, "prompt",
     "ending with the user's"),
    ({"prompt": [said("user", "Say '\n\nHuman: x'"), said("assistant", "x"), USER], "chosen": "P.", "rejected": "R."},
     "prompt", "would not read back"),
    ({"chosen": [said("assistant", "Paris.")], "rejected": [said("assistant", "Rome.")]}, "prompt", "missing"),
    ({"prompt": [said("user", "Hi"), said("assistant", "Hello!"), said("user", " ")], "chosen": "P.", "rejected": "R."},
     "prompt", "message 2 is empty"),
    ({"prompt": [said("assistant", "Welcome!"), USER], "chosen": "P.", "rejected": "R."}, "prompt",
     "first message is the assistant's"),
    ({"prompt": "Q?", "chosen": {"text": "Paris."}, "rejected": "Rome."}, "chosen", "a string or a list"),
], ids=["sides-disagree", "side-disagrees-with-prompt", "no-reply", "system-turn", "prompt-ends-with-reply",
        "quotes-a-marker", "no-prompt-anywhere", "empty-turn", "assistant-first", "wrong-type"])
def test_bad_conversational_pairs_name_their_column(tmp_path, row, column, words):
    path = write_rows(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert words in assert_data_error(error, path, row=1, column=column)


@pytest.mark.parametrize("suffix", FORMATS)
def test_rated_responses_are_put_best_first_and_keep_their_ties(tmp_path, suffix):
    """UltraFeedback rates each of its 4 completions: the rating orders them, and equal ratings stay ties."""
    rows = [{"prompt": "p", "responses": ["ok", "best", "bad", "fine"], "ratings": [3, 5.0, 1, 3],
             "gold_scores": [0.3, 0.5, 0.1, 0.31]},
            {"prompt": "q", "responses": ["a", "b"], "ratings": [2, 2]}]  # all alike: says nothing, skipped
    dataset = load(write_rows(tmp_path / f"rated{suffix}", rows), "preferences")
    assert len(dataset) == 1
    assert dataset[0]["responses"] == ["best", "ok", "fine", "bad"]  # the tie keeps its order
    assert dataset[0]["ratings"] == [5.0, 3.0, 3.0, 1.0] and dataset[0]["gold_scores"] == [0.5, 0.3, 0.31, 0.1]
    bad = write_rows(tmp_path / f"short{suffix}", [{"prompt": "p", "responses": ["a", "b", "c"], "ratings": [1, 2]}])
    with pytest.raises(DataError) as error:
        load(bad, "preferences")
    assert "expected a list of 3 finite numbers aligned with 'responses'" in assert_data_error(error, bad, 1, "ratings")
    nan = write_rows(tmp_path / f"nan{suffix}",
                     [{"prompt": "p", "responses": ["a", "b"], "ratings": [3.0, float("nan")]}])
    with pytest.raises(DataError) as error:  # UltraFeedback's "N/A" ratings become NaN through pandas
        load(nan, "preferences")
    assert_data_error(error, nan, 1, "ratings")
    # streamed, rows after a first one without ratings (another file's) still sort by theirs
    (tmp_path / "mixed").mkdir()
    write_rows(tmp_path / "mixed" / f"a_ranked{suffix}", [{"prompt": "r", "responses": ["x", "y"]}])
    write_rows(tmp_path / "mixed" / f"b_rated{suffix}", rows[:1])
    streamed = list(load(tmp_path / "mixed", "preferences", streaming=True))
    assert streamed[1]["responses"] == ["best", "ok", "fine", "bad"] and streamed[1]["ratings"] == [5.0, 3.0, 3.0, 1.0]
    # beside a file without ratings (a strict ranking), the rated file keeps its ties
    (tmp_path / "both").mkdir()
    write_rows(tmp_path / "both" / f"rated{suffix}", rows[:1])
    write_rows(tmp_path / "both" / f"ranked{suffix}", [{"prompt": "r", "responses": ["x", "y"]}])
    both = load(tmp_path / "both", "preferences")
    assert sorted(both["ratings"], key=str) == [None, [5.0, 3.0, 3.0, 1.0]]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("suffix", FORMATS)
def test_a_null_rating_in_a_rated_source_is_refused_by_its_row(tmp_path, suffix, streaming):
    """A row whose ratings cell was null read its responses as ranked best first, beside rows whose ratings order
    theirs: 'bad' became its chosen reply. A file without ratings is still a best-first ranking (above)."""
    rated = write_rows(tmp_path / f"rated{suffix}", [{"prompt": "Q", "responses": ["bad", "good"], "ratings": [1, 9]},
                                                     {"prompt": "Q2", "responses": ["bad", "good"], "ratings": None}])
    with pytest.raises(DataError) as error:
        list(load(rated, "preferences", streaming=streaming))
    assert "null in this row, in a source whose responses are rated by 'ratings'" in \
        assert_data_error(error, rated, 2, "ratings")
    ranked = write_rows(tmp_path / f"nectar{suffix}", [{"prompt": "Q", "responses": ["bad", "good"], "ranks": None},
                                                       {"prompt": "Q2", "responses": ["bad", "good"], "ranks": [2, 1]}])
    with pytest.raises(DataError) as error:
        list(load(ranked, "preferences", streaming=streaming))
    assert_data_error(error, ranked, 1, "ranks")
    scored = write_rows(tmp_path / f"scored{suffix}", [{"q": "Q", "answers": ["bad", "good"], "score": [1, 9]},
                                                       {"q": "Q2", "answers": ["bad", "good"], "score": None}])
    with pytest.raises(DataError) as error:
        list(load(scored, "preferences", streaming=streaming,
                  columns={"prompt": "q", "responses": "answers", "ratings": "score"}))
    assert "(read from source column 'score')" in assert_data_error(error, scored, 2, "ratings")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_pair_beside_rated_rows_needs_no_rating(tmp_path, streaming):
    """A chosen/rejected row says which reply is better itself: beside rated rows its null rating is no gap (it was
    refused as one). JSON lines only: a table's cells cannot tell a missing column from a null one."""
    mixed = write_rows(tmp_path / "mixed.jsonl", [{"prompt": "Q1", "responses": ["a", "b"], "ratings": [1, 2]},
                                                  {"prompt": "Q2", "chosen": "good", "rejected": "bad"}])
    rows = list(load(mixed, "preferences", streaming=streaming))
    assert [row["responses"] for row in rows] == [["b", "a"], ["good", "bad"]]


@pytest.mark.parametrize("suffix", FORMATS)
def test_raw_ultrafeedback_completions_map_to_rated_responses(tmp_path, suffix):
    """openbmb/UltraFeedback keeps each instruction's completions as a list of records; `list.field` reaches in."""
    completions = [{"model": "a", "response": "fine", "overall_score": 6.5},
                   {"model": "b", "response": "best", "overall_score": 9.0},
                   {"model": "c", "response": "poor", "overall_score": 2.0}]
    path = write_rows(tmp_path / f"uf{suffix}", [{"instruction": "Explain tides.", "completions": completions}])
    columns = {"prompt": "instruction", "responses": "completions.response", "ratings": "completions.overall_score"}
    assert load(path, "preferences", columns=columns)[0] == {
        "prompt": "Explain tides.", "responses": ["best", "fine", "poor"], "ratings": [9.0, 6.5, 2.0]}
    flat = write_rows(tmp_path / f"flat{suffix}", [{"instruction": "Explain tides.", "completions": "just text"}])
    with pytest.raises(DataError) as error:
        load(flat, "preferences", columns=columns)
    assert "not a list of records" in assert_data_error(error, flat, 1, "responses")
    with pytest.raises(DataError) as error:
        load(flat, "preferences", columns=columns, streaming=True)
    assert "not a list of records" in assert_data_error(error, flat, 1, "responses")
    assert list(load(path, "preferences", columns=columns, streaming=True))[0]["responses"] == ["best", "fine", "poor"]
    with pytest.raises(DataError) as error:
        load(path, "preferences", columns={**columns, "responses": "answers.response"})
    assert_data_error(error, path, 1, "answers.response")


def test_gold_scores_not_aligned(tmp_path):
    path = write_rows(tmp_path / "ranked.jsonl", [{"prompt": "p", "responses": ["a", "b"], "gold_scores": [1.0]}])
    with pytest.raises(DataError) as error:
        load(path, "preferences")
    assert_data_error(error, path, row=1, column="gold_scores")


@pytest.mark.parametrize("suffix", FORMATS)
def test_empty_dataset(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_dict({"prompt": []}, features=datasets.Features(
            {"prompt": datasets.Value("string")})).to_parquet(str(path))
    else:
        path.write_text("")
    with pytest.raises(DataError) as error:
        load(path, "prompts")
    assert "no rows" in assert_data_error(error, path, row=None, column=None)


def test_blank_text_file_is_empty(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(DataError, match="blank.txt.*no rows"):
        load(path, "text")


@pytest.mark.parametrize("name, content", [("blank.jsonl", "\n\n"), ("header.csv", "prompt,other\n")])
def test_a_file_of_blank_lines_or_a_header_alone_has_no_rows(tmp_path, name, content):
    """Was datasets' 'Instruction "train" corresponds to no data!'."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: no rows \(only blank lines, or a header alone\)"):
        load(path, "prompts")


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_a_file_of_empty_objects_names_the_column_its_first_row_lacks(tmp_path, streaming):
    """datasets reads a file whose rows are all {} as one with no rows: it was refused as 'no rows', naming neither
    row nor column, where the same {} after a valid row is named."""
    path = tmp_path / "empty.jsonl"
    path.write_text("{}\n{}\n")
    with pytest.raises(DataError) as error:
        load(path, "preferences", streaming=streaming)
    assert "missing" in assert_data_error(error, path, row=1, column="prompt")


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".txt.gz"])
def test_a_corrupt_or_truncated_gzip_file_is_named(tmp_path, suffix):
    """A download cut short raised a bare EOFError (JSON), or was named only 'DatasetGenerationError' (text)."""
    import gzip

    whole = gzip.compress(b'{"text": "a line of text"}\n' * 200)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError) as error:
        load(path, "text")
    message = assert_data_error(error, path, row=None, column=None)
    assert "EOFError" in message and "DatasetGenerationError" not in message


def test_missing_path(tmp_path):
    path = tmp_path / "does_not_exist.jsonl"
    with pytest.raises(DataError) as error:
        load(path, "text")
    assert "file not found" in assert_data_error(error, path, row=None, column=None)


def test_corrupt_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "cut off\n')
    with pytest.raises(DataError) as error:
        load(path, "text")
    assert "not valid JSON" in assert_data_error(error, path, row=3, column=None)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError) as error:
        load(path, "text")
    message = assert_data_error(error, path, row=None, column=None)
    assert "cannot read as parquet" in message and "Parquet magic bytes" in message


def test_unsupported_file_and_unknown_schema(tmp_path):
    path = tmp_path / "table.xlsx"
    path.write_text("prompt\nhello\n")
    with pytest.raises(DataError, match="table.xlsx.*unsupported file type '.xlsx'"):
        load(path, "prompts")
    with pytest.raises(ValueError, match="unknown schema 'chat'"):
        load(path, "chat")


def test_error_in_a_directory_names_the_file_and_its_own_row(tmp_path):
    write_rows(tmp_path / "a.jsonl", [{"prompt": "ok"}, {"prompt": "ok too"}])
    bad = write_rows(tmp_path / "b.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    with pytest.raises(DataError) as error:
        load(tmp_path, "prompts")
    assert "expected a non-empty string" in assert_data_error(error, bad, row=2, column="prompt")


@pytest.mark.parametrize("suffix", FORMATS)
def test_public_preference_sets_load_as_published(tmp_path, suffix):
    """From an audit of public datasets' own schemas: Nectar ranks its answers (1 is best) and came out worst
    first as ratings; one empty or repeated UltraFeedback completion stopped the whole run; a mapped column no
    schema reads (Orca's system prompt) was dropped without a word."""
    nectar = write_rows(tmp_path / f"nectar{suffix}", [{"prompt": "Explain tides.", "answers": [
        {"answer": "the moon pulls", "model": "a", "rank": 1}, {"answer": "magnets", "model": "b", "rank": 3},
        {"answer": "gravity and the sun", "model": "c", "rank": 2}]}])
    assert load(nectar, "preferences", columns={"responses": "answers.answer", "ranks": "answers.rank"})[0] == {
        "prompt": "Explain tides.", "responses": ["the moon pulls", "gravity and the sun", "magnets"],
        "ratings": [-1.0, -2.0, -3.0]}
    completions = [{"response": "fine", "overall_score": 6.0}, {"response": "", "overall_score": 9.0},
                   {"response": "fine", "overall_score": 7.0}, {"response": "poor", "overall_score": 2.0}]
    lone = [{"response": "same", "overall_score": 5.0}, {"response": "same", "overall_score": 4.0}]
    uf = write_rows(tmp_path / f"uf{suffix}", [{"instruction": "Explain tides.", "completions": completions},
                                               {"instruction": "Say hi.", "completions": lone}])
    columns = {"prompt": "instruction", "responses": "completions.response", "ratings": "completions.overall_score"}
    assert load(uf, "preferences", columns=columns)[:] == {  # the empty one gone, "fine" once at its best rating
        "prompt": ["Explain tides."], "responses": [["fine", "poor"]], "ratings": [[7.0, 2.0]]}
    orca = write_rows(tmp_path / f"orca{suffix}", [{"system": "Be kind.", "question": "q", "chosen": "a",
                                                    "rejected": "b"}])
    with pytest.raises(DataError, match=r"key 'DatasetSpec\.columns\.system': 'system' is no column schema "
                                        r"'preferences' reads; it reads prompt, responses, chosen, rejected"):
        load(orca, "preferences", columns={"prompt": "question", "system": "system"})


def test_hub_downloads_read_as_shipped(tmp_path):
    """A hub folder's shard names carry a hash after their numbering; hh-rlhf ships gzipped JSON lines;
    OpenAssistant calls the user 'prompter'; an hh pair whose transcripts part before the last reply has no one
    prompt (each side's reply held the other's later turns)."""
    import gzip

    alpaca = tmp_path / "alpaca" / "data"
    alpaca.mkdir(parents=True)
    write_rows(alpaca / "train-00000-of-00001-a09b74b3ef9c3b56.parquet", [{"prompt": "p", "completion": "c"}])
    assert len(load(tmp_path / "alpaca", "sft")) == 1
    hh = tmp_path / "hh" / "train.jsonl.gz"
    hh.parent.mkdir()
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Joke?\n\nAssistant: No.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Yo.\n\nHuman: Joke?\n\nAssistant: Sure."}]
    hh.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert load(hh.parent, "preferences")[:] == {"prompt": ["\n\nHuman: Hi\n\nAssistant:"],
                                                 "responses": [["Hello.", "Go away."]]}
    (hh.parent / "train.jsonl").write_bytes(gzip.decompress(hh.read_bytes()))  # `gunzip -k`: the rows twice
    with pytest.raises(DataError, match=r"train.jsonl.gz: train.jsonl beside it .* keep one of the two"):
        load(hh.parent, "preferences")
    oasst = write_rows(tmp_path / "oasst.jsonl", [{"messages": [{"role": "prompter", "content": "Hi"},
                                                                {"role": "assistant", "content": "Hello."}]}])
    assert load(oasst, "sft")[0]["messages"][0] == {"role": "user", "content": "Hi"}


def test_the_public_schema_readers_refuse_or_keep_what_they_should(tmp_path):
    """From a review of the readers above: a wrong type is a data error, not a TypeError; a stray .csv.gz in a
    folder is passed over as before; a gzipped file's bad line is named by its line; an hh reply that quotes
    'Human:' (not as hh-rlhf opens a turn) is no later exchange; rated copies that differ in whitespace are one
    reply, with their gold scores; a NaN rating is refused; ranks of another length name 'ranks'; Alpaca's input
    keeps its indentation, in prompts too."""
    import gzip

    odd_role = write_rows(tmp_path / "odd.jsonl", [{"messages": [{"role": ["user"], "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello."}]}])
    with pytest.raises(DataError) as error:
        load(odd_role, "sft")
    assert_data_error(error, odd_role, 1, "messages")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "data.jsonl", [{"prompt": "p"}])
    (folder / "notes.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    assert load(folder, "prompts")["prompt"] == ["p"]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": \n'))
    with pytest.raises(DataError, match=r"row 4: not valid JSON"):
        load(broken, "prompts")
    # a reply may quote 'Human:' in a line of its own; one after a blank line, as hh-rlhf opens a turn, can not be
    # told from a transcript that goes on past its reply, and is skipped as one (test above)
    asked = "\n\nHuman: Say hi\n\nAssistant:"
    no = asked + " No."
    quoting = write_rows(tmp_path / "hh.jsonl", [{"chosen": asked + " Sure:\nHuman: Hello.", "rejected": no},
                                                 {"chosen": asked + " Sure:\n\nHuman: Hello.", "rejected": no}])
    assert load(quoting, "preferences")["responses"] == [["Sure:\nHuman: Hello.", "No."]]
    rated = write_rows(tmp_path / "rated.jsonl", [
        {"prompt": "q", "responses": ["Same answer.", "other", "Same answer. "], "ratings": [3, 1, 5],
         "gold_scores": [0.5, 0.1, 0.6]}])
    assert load(rated, "preferences")[0] == {"prompt": "q", "responses": ["Same answer.", "other"],  # stripped
                                             "ratings": [5.0, 1.0], "gold_scores": [0.6, 0.1]}
    nan = write_rows(tmp_path / "nan.jsonl", [{"prompt": "q", "responses": ["a", "a", "b"],
                                               "ratings": [float("nan"), 3, 1]}])
    with pytest.raises(DataError) as error:
        load(nan, "preferences")
    assert_data_error(error, nan, 1, "responses")
    short = write_rows(tmp_path / "short.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranks": [1]}])
    with pytest.raises(DataError) as error:
        load(short, "preferences")
    assert "expected 2 ranks" in assert_data_error(error, short, 1, "ranks")
    code = write_rows(tmp_path / "code.jsonl", [{"prompt": "Fix this.", "input": "    return x\n", "completion": "ok"}])
    assert load(code, "sft")[0]["messages"][0]["content"] == "Fix this.\n\n    return x"
    assert load(code, "prompts")[0]["prompt"] == "Fix this.\n\n    return x"


def test_errors_in_the_spec_name_its_config_key_and_a_null_cell_is_called_null(tmp_path):
    """A bad `columns` entry or an empty path was "data error in DatasetSpec" (not which of data or eval_data), a
    null cell "missing ... found columns: none", and a number as an SFT completion asked for messages alone."""
    path = write_rows(tmp_path / "sft.jsonl", [{"prompt": "Q?", "completion": "A."}, {"prompt": None, "completion": "B."}])
    with pytest.raises(DataError, match=r"key 'eval_data\.columns\.system': 'system' is no column schema 'sft' reads"):
        load_dataset_for(DatasetSpec(path=str(path), columns={"system": "prompt"}), "sft", key="eval_data")
    with pytest.raises(DataError) as error:
        load_dataset_for(DatasetSpec(path=str(path), columns={"prompt": "instruction"}), "sft", key="data")
    assert "not found (key 'data.columns.prompt' names it)" in assert_data_error(error, path, 1, "instruction")
    with pytest.raises(DataError, match=r"key 'prompts\.path': empty"):
        load_dataset_for(DatasetSpec(path=" "), "prompts", key="prompts")
    with pytest.raises(DataError) as error:
        load(path, "sft")
    assert "null in this row" in assert_data_error(error, path, 2, "prompt")
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "Q?"}, {"prompt": None}])
    with pytest.raises(DataError) as error:
        load(prompts, "prompts")
    assert "null in this row" in assert_data_error(error, prompts, 2, "prompt")
    number = write_rows(tmp_path / "number.jsonl", [{"prompt": "Q?", "completion": 0}])
    with pytest.raises(DataError) as error:
        load(number, "sft")
    assert "expected a string or a list of {'role', 'content'} messages, got int 0" in \
        assert_data_error(error, number, 1, "completion")


@pytest.mark.parametrize("row, column, message", [
    ({"messages": [said("user", "Hi"), said("assistant", " "), said("user", "1?"), said("assistant", "1.")]},
     "messages", 1),
    ({"prompt": "Hi", "completion": [said("assistant", "")]}, "completion", 0),
], ids=["messages", "the-completion"])
def test_an_empty_assistant_turn_is_refused_by_its_column_and_message(tmp_path, row, column, message):
    """Every trained assistant turn must say something: an empty one taught ending the turn unanswered. One inside
    a prompt is context, not trained, and is read (see the hh transcript test above)."""
    path = write_rows(tmp_path / "sft.jsonl", [row])
    with pytest.raises(DataError) as error:
        load(path, "sft")
    assert f"message {message} (the assistant's) is empty" in assert_data_error(error, path, row=1, column=column)


def test_a_prompt_that_runs_on_into_a_reply_is_read_with_a_warning(tmp_path, capsys):
    """hh-rlhf's `chosen` mapped as a PPO prompt holds the reply: read as one user message quoting the transcript,
    which it said nothing of. A prompt quoting a dialogue on purpose stays readable."""
    from pipeline.tokenizer import prompt_messages

    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "\n\nHuman: Hi\n\nAssistant:"},
                                                   {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!"}])
    rows = load(path, "prompts")
    assert prompt_messages(rows[1]["prompt"]) == [{"role": "user", "content": rows[1]["prompt"]}]
    assert "warning: 1 prompt(s), the first in row 2 of those read, are hh-rlhf transcripts" in capsys.readouterr().out
    load(write_rows(tmp_path / "fine.jsonl", [{"prompt": "\n\nHuman: Hi\n\nAssistant:"}]), "prompts")
    assert "warning" not in capsys.readouterr().out



def test_a_world_split_that_is_not_there_names_the_worlds_splits_and_the_nearest(tmp_path):
    """`prompts.path=world:ppo_promts` said the file was not found and that a directory written by write_world was
    expected, of a directory that is one."""
    world_dir = tmp_path / "world"
    world_dir.mkdir()
    for split in ("ppo_prompts", "pref_prompts"):
        (world_dir / f"{split}.jsonl").write_text('{"prompt": "hi"}\n')
    (world_dir / "world_config.json").write_text("{}")
    with pytest.raises(DataError, match=r"world:ppo_promts: the world in .*world has no split 'ppo_promts' \(its "
                                        r"splits: ppo_prompts, pref_prompts\); did you mean world:ppo_prompts\?"):
        load_dataset_for(DatasetSpec(path="world:ppo_promts"), "prompts", world_dir=world_dir)
    with pytest.raises(DataError, match=r"no split 'nope' \(its splits: ppo_prompts, pref_prompts\)$"):
        load_dataset_for(DatasetSpec(path="world:nope"), "prompts", world_dir=world_dir)
    # a directory that is no world is still said to be none
    with pytest.raises(DataError, match=r"expected a directory written by data.world.write_world"):
        load_dataset_for(DatasetSpec(path="world:ppo_prompts"), "prompts", world_dir=tmp_path)
