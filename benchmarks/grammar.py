"""What a grammar costs: the embedded model (or --model), greedy, one request at a time, prompts asking
for a country as JSON of a five-field schema (or, with --task extraction, for five fields of a short
text as JSON); tok/s with the schema as a grammar against the same prompts unconstrained, decoded
plainly and with speculation (the server's default), the modes taking turns prompt by prompt in this
one process, so that the ratios are measured in one run.

    python -m benchmarks.grammar --dtype float32
    python -m benchmarks.grammar --dtype auto --task extraction
    python -m benchmarks.grammar --device cuda --dtype bfloat16 --json   # as benchmarks/gpu_check.sh does

A grammar's request speculates on the tokens its grammar forces (a JSON schema's keys and
punctuation) and on the prompt-lookup guesses it allows between them (what the answer copies from
the prompt: a name, a date) and pays for llguidance's masks (`runtime.grammar`); "grammar-plain" is
the same request without speculation, "grammar / speculative" what a grammar's request gives up
against an unconstrained one.
"""

from __future__ import annotations

import argparse
import json
import time

from runtime.config import SamplingParams
from runtime.grammar import compile_grammar
from server.app import load_engine
from server.settings import Settings

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "capital", "languages", "population_millions", "in_europe"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "capital": {"type": "string", "maxLength": 40},
                         "languages": {"type": "array", "maxItems": 4,
                                       "items": {"type": "string", "maxLength": 30}},
                         "population_millions": {"type": "integer"}, "in_europe": {"type": "boolean"}}}
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India"]
FIELDS = ["person", "company", "city", "date", "amount"]
EXTRACTION_SCHEMA = {"type": "object", "additionalProperties": False, "required": FIELDS,
                     "properties": {field: {"type": "string", "maxLength": 60} for field in FIELDS}}
TEXTS = [
    "On 12 March 2024, Maria Gonzalez of Bluewave Logistics signed a contract in Rotterdam worth 48,500 "
    "euros.",
    "Invoice from Northwind Traders to Peter Olsen, Copenhagen, dated 3 June 2023: total due 1,250 dollars.",
    "Dr. Aiko Tanaka joined Sakura Robotics in Osaka on 1 April 2022 with a starting salary of 9 million "
    "yen.",
    "The city council of Lyon awarded Jean Martin's firm, Martin Batiment, a 2.3 million euro contract on "
    "15 September 2021.",
    "Samuel Okafor, founder of the Lagos company GreenGrid Energy, raised 7 million dollars on 20 January "
    "2025.",
    "Priya Raman signed for Helix Analytics in Bangalore on 8 November 2023; the deal is worth 600,000 "
    "rupees."]


def tasks(task: str) -> tuple[dict, list[tuple[str, str]]]:
    """The schema and the (label, request) pairs of a task."""
    if task == "extraction":
        return EXTRACTION_SCHEMA, [(text[:30], f"Extract the person, company, city, date and amount "
                                   f"from this text as JSON.\n\nText: {text}") for text in TEXTS]
    return SCHEMA, [(country, f"Describe {country} as JSON: name, capital, languages, population in "
                              "millions, whether it is in Europe.") for country in COUNTRIES]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="as medusa-serve's --model (default: the embedded one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="as medusa-serve's")
    parser.add_argument("--drafter", choices=["heads", "eagle"], default="heads")
    parser.add_argument("--medusa-heads", default=None, help="heads folder (default: the server's choice)")
    parser.add_argument("--eagle", default=None, help="draft layer folder, with --drafter eagle")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--limit", type=int, default=None, help="the task's first prompts only")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--task", choices=["countries", "extraction"], default="countries")
    parser.add_argument("--json", action="store_true", help="the summary as a JSON line at the end")
    parser.add_argument("--prompts", help="not read: a task brings its prompts (gpu_check.sh passes it to "
                                          "every real-model part)")
    args = parser.parse_args(argv)
    drafter = args.eagle if args.drafter == "eagle" else args.medusa_heads
    loaded, engine = load_engine(Settings(model=args.model, device=args.device, dtype=args.dtype,
                                          compile=args.compile, drafter=args.drafter,
                                          medusa_heads=drafter or "auto"))
    tokenizer = loaded.tokenizer
    n = args.max_new_tokens
    schema, requests = tasks(args.task)
    requests = requests[:args.limit]
    grammar = compile_grammar("json", schema)
    modes = {"grammar": SamplingParams(max_new_tokens=n, grammar=grammar),
             "grammar-plain": SamplingParams(max_new_tokens=n, grammar=grammar, speculate=False),
             "plain": SamplingParams(max_new_tokens=n, speculate=False),
             "speculative": SamplingParams(max_new_tokens=n)}
    engine.grammars.check(modes["grammar"].grammar)  # builds llguidance's vocabulary, outside the timing
    totals = {mode: [0, 0.0] for mode in modes}  # tokens, seconds
    outputs: dict[str, list[list[int]]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for label, request in requests:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                                   add_generation_prompt=True)
            for mode, params in modes.items():
                start = time.perf_counter()
                tokens = engine.generate([prompt], params)[0]
                totals[mode][0] += len(tokens)
                totals[mode][1] += time.perf_counter() - start
                outputs[mode].append(tokens)
                if repeat == 0 and mode == "grammar":
                    print(f"{label}: {tokenizer.decode(tokens, skip_special_tokens=True)[:120]}")
    speed = {mode: tokens / seconds for mode, (tokens, seconds) in totals.items()}
    for mode, (tokens, _) in totals.items():
        print(f"{mode}: {tokens} tokens, {speed[mode]:.1f} tok/s")
    print(f"grammar / plain: {speed['grammar'] / speed['plain']:.3f}; "
          f"grammar / speculative: {speed['grammar'] / speed['speculative']:.3f}; "
          f"grammar / grammar-plain: {speed['grammar'] / speed['grammar-plain']:.3f}")
    summary = {"task": args.task, "prompts": len(requests), "device": args.device, "dtype": loaded.dtype_name,
               **{f"{mode.replace('-', '_')}_tok_s": round(v, 1) for mode, v in speed.items()},
               "grammar_vs_grammar_plain": round(speed["grammar"] / speed["grammar-plain"], 3),
               "grammar_vs_speculative": round(speed["grammar"] / speed["speculative"], 3),
               "same_output": outputs["grammar"] == outputs["grammar-plain"]}
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
