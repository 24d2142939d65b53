# The README's two commands: `make demo` (the main job, end to end) and `make test`.
# Both create .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data/aigi-dev
BACKBONE ?= ViT-L-14:openai
OUT    ?= demo-out
SHOTS  ?= 10
HEAD   ?= svm
CACHE  ?= $(OUT)/cache.h5

.PHONY: venv test demo clean-demo bench lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check clipdet tests benchmarks

# extract → fit --shots $(SHOTS) → score → eval (with report), on DATA laid out as real/ and fake/<generator>/
demo: venv
	@mkdir -p $(OUT)
	$(BIN)/clipdet extract "$(DATA)" --backbone "$(BACKBONE)" --cache "$(CACHE)" --views jpeg:75,resize:0.5 --quiet; \
	  rc=$$?; [ $$rc -le 1 ] || exit $$rc
	$(BIN)/clipdet fit --backbone "$(BACKBONE)" --cache "$(CACHE)" --head $(HEAD) --shots $(SHOTS) --seed 0 \
	  --out "$(OUT)/detector.clipdet"
	$(BIN)/clipdet score "$(DATA)" --detector "$(OUT)/detector.clipdet" --cache "$(CACHE)" --out "$(OUT)/scores.csv" --quiet; \
	  rc=$$?; [ $$rc -le 1 ] || exit $$rc
	$(BIN)/clipdet eval "$(DATA)" --detector "$(OUT)/detector.clipdet" --cache "$(CACHE)" --exclude-references \
	  --views jpeg:75,resize:0.5 --report "$(OUT)/report" --quiet
	@echo "demo done: cache $(CACHE), detector $(OUT)/detector.clipdet, scores $(OUT)/scores.csv, report $(OUT)/report/report.md"

clean-demo:
	rm -rf $(OUT)
