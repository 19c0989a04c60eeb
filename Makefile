# Thin aliases for ./dev, which installs what each habit needs first.
.PHONY: run test lint bench proto setup
run:   ; ./dev run
test:  ; ./dev test
lint:  ; ./dev lint
bench: ; ./dev bench
proto: ; ./dev proto
setup: ; ./dev setup
