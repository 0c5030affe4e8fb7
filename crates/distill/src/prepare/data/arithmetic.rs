//! A seeded generator of multi-step arithmetic word problems, each with a
//! step-by-step solution and a final `#### N` line, and the verifier that
//! checks an answer. The same shape as GSM8K, small enough to learn on a CPU.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Example;

/// Difficulty knobs, from `[data]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct Difficulty {
    pub min_steps: usize,
    pub max_steps: usize,
    pub max_operand: u32,
    pub allow_multiply: bool,
}

const NAMES: &[&str] = &[
    "Ava", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Milo", "Nora", "Omar",
    "Pia", "Quin", "Rosa", "Sam", "Tara",
];
const ITEMS: &[&str] = &[
    "apples", "marbles", "coins", "books", "stickers", "shells", "pencils", "cards", "eggs", "stamps",
];

/// One problem drawn from `rng`.
pub fn problem(rng: &mut ChaCha8Rng, d: &Difficulty) -> Example {
    let name = *NAMES.choose(rng).unwrap_or(&"Sam");
    let item = *ITEMS.choose(rng).unwrap_or(&"apples");
    let steps = rng.random_range(d.min_steps..=d.max_steps);
    let mut value = rng.random_range(1..=d.max_operand as i64);
    let mut text = format!("{name} has {value} {item}.");
    let mut solution = Vec::with_capacity(steps);
    for _ in 0..steps {
        // 0: add, 1: subtract (only when something is left), 2: multiply.
        let kinds: &[u8] = match (value > 1, d.allow_multiply) {
            (true, true) => &[0, 1, 2],
            (true, false) => &[0, 1],
            (false, true) => &[0, 2],
            (false, false) => &[0],
        };
        let kind = *kinds.choose(rng).unwrap_or(&0);
        let next = match kind {
            0 => {
                let b = rng.random_range(1..=d.max_operand as i64);
                let verb = ["buys", "finds", "is given", "collects"]
                    .choose(rng)
                    .copied()
                    .unwrap_or("buys");
                text += &format!(" Then {name} {verb} {b} more.");
                solution.push(format!("{value} + {b} = {}", value + b));
                value + b
            }
            1 => {
                let b = rng.random_range(1..=value.min(d.max_operand as i64));
                let verb = ["gives away", "loses", "sells", "uses"]
                    .choose(rng)
                    .copied()
                    .unwrap_or("loses");
                text += &format!(" Then {name} {verb} {b}.");
                solution.push(format!("{value} - {b} = {}", value - b));
                value - b
            }
            _ => {
                let (k, word) = *[(2, "doubles"), (3, "triples")].choose(rng).unwrap_or(&(2, "doubles"));
                text += &format!(" Then {name} {word} the {item}.");
                solution.push(format!("{value} * {k} = {}", value * k));
                value * k
            }
        };
        value = next;
    }
    text += &format!(" How many {item} does {name} have now?\n");
    Example {
        prompt: text,
        completion: format!("{}\n#### {value}", solution.join("\n")),
        answer: Some(value),
    }
}

/// `n` problems from the ChaCha stream (`seed`, `stream`).
pub fn generate(n: usize, d: &Difficulty, seed: u64, stream: u64) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..n).map(|_| problem(&mut rng, d)).collect()
}

/// The final answer of a solution: the integer after the last `####`.
pub fn extract_answer(text: &str) -> Option<i64> {
    let (_, tail) = text.rsplit_once("####")?;
    let token = tail.split_whitespace().next()?;
    token.trim_end_matches(['.', ',']).replace(',', "").parse().ok()
}

/// Whether `completion` ends in the expected answer.
pub fn verify(completion: &str, expected: i64) -> bool {
    extract_answer(completion) == Some(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Difficulty = Difficulty {
        min_steps: 2,
        max_steps: 4,
        max_operand: 20,
        allow_multiply: true,
    };

    #[test]
    fn same_seed_same_problems_other_stream_other_problems() {
        let a = generate(50, &D, 7, 0);
        let b = generate(50, &D, 7, 0);
        let c = generate(50, &D, 7, 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_solution_checks_out_step_by_step() {
        for ex in generate(500, &D, 3, 0) {
            let answer = ex.answer.expect("arithmetic examples carry their answer");
            assert!(verify(&ex.completion, answer), "{ex:?}");
            let lines: Vec<&str> = ex.completion.lines().collect();
            let steps = lines.len() - 1;
            assert!((D.min_steps..=D.max_steps).contains(&steps), "{ex:?}");
            // Each line `a op b = c` is true arithmetic and chains into the next.
            let mut prev: Option<i64> = None;
            for line in &lines[..steps] {
                let parts: Vec<&str> = line.split_whitespace().collect();
                let (a, op, b, c): (i64, &str, i64, i64) = (
                    parts[0].parse().unwrap(),
                    parts[1],
                    parts[2].parse().unwrap(),
                    parts[4].parse().unwrap(),
                );
                let want = match op {
                    "+" => a + b,
                    "-" => a - b,
                    "*" => a * b,
                    _ => panic!("unknown op in {line}"),
                };
                assert_eq!(want, c, "{line}");
                assert!(c >= 0, "{line}");
                if let Some(p) = prev {
                    assert_eq!(p, a, "steps must chain: {ex:?}");
                }
                prev = Some(c);
            }
            assert_eq!(prev, Some(answer));
        }
    }

    #[test]
    fn verifier_extracts_the_last_answer() {
        assert_eq!(extract_answer("1 + 2 = 3\n#### 3"), Some(3));
        assert_eq!(extract_answer("#### 1\n#### -42."), Some(-42));
        assert_eq!(extract_answer("#### 1,024"), Some(1024));
        assert_eq!(extract_answer("no answer"), None);
        assert_eq!(extract_answer("#### "), None);
        assert_eq!(extract_answer("#### x"), None);
        assert!(verify("5 * 2 = 10\n#### 10", 10));
        assert!(!verify("5 * 2 = 10\n#### 11", 10));
    }
}
