import Foundation

/// How a decoded response is turned into a vote.
///
/// - `reference`: bit-for-bit the reference implementation's extractor (see
///   `extractReferenceAnswer`). Every response yields a vote, garbage included; it never
///   returns nil. The reference decodes with special tokens kept, so pass the text decoded
///   that way: an empty reply is the literal `"<|im_end|>"` and votes as `"<|IM_END|>"`.
/// - `strict(options:)`: our default for multiple choice. Only an unambiguous choice of one
///   option is a vote; anything else is invalid (nil). See `extractStrictAnswer`.
/// - `open`: free-form short answers (VQA), compared after normalisation. See
///   `normalizeOpenAnswer`.
public enum AnswerMode: Sendable, Equatable {
    case reference
    case strict(options: [String])
    case open
}

/// The vote a response casts, or nil when it casts none (invalid).
/// `.reference` never returns nil.
public func extractAnswer(_ text: String, mode: AnswerMode) -> String? {
    switch mode {
    case .reference: return extractReferenceAnswer(text)
    case .strict(let options): return extractStrictAnswer(text, options: options)
    case .open: return normalizeOpenAnswer(text)
    }
}

// MARK: - Reference mode

/// The reference extractor, step by step in Python terms:
/// `s = text.strip("\n").rstrip("./").strip(" ").lstrip(":").upper()`, then the last match of
/// `\b(A|B|C|D)\b` in `s`, else `s` itself, then `.rstrip("./")`.
///
/// Everything works on Unicode scalars because Python strings are code-point sequences:
/// Swift's grapheme clusters would glue "\r\n" into one character (so `strip("\n")` would
/// miss it) and a combining mark onto the letter before it (hiding a `\b`).
/// "Strip newlines" is read as Python's `strip("\n")` (ends only), like the other steps, and
/// the two right-strips of "." and "/" as one `rstrip("./")`; reading them as
/// `.rstrip(".").rstrip("/")` would differ only for replies ending in "./".
/// Quirk kept on purpose: "B, a cat" → "A" (the article is upper-cased and matched last).
public func extractReferenceAnswer(_ text: String) -> String {
    var s = Array(text.unicodeScalars)
    s = stripped(s, leading: ["\n"], trailing: ["\n"])
    s = stripped(s, leading: [], trailing: [".", "/"])
    s = stripped(s, leading: [" "], trailing: [" "])
    s = stripped(s, leading: [":"], trailing: [])
    s = Array(String(String.UnicodeScalarView(s)).uppercased().unicodeScalars)
    if let letter = lastStandaloneLetter(in: s, letters: ["A", "B", "C", "D"]) {
        return String(letter)
    }
    return String(String.UnicodeScalarView(stripped(s, leading: [], trailing: [".", "/"])))
}

/// Python's `str.strip(chars)` / `lstrip` / `rstrip` on code points.
private func stripped(
    _ s: [Unicode.Scalar], leading: Set<Unicode.Scalar>, trailing: Set<Unicode.Scalar>
) -> [Unicode.Scalar] {
    var lo = 0
    var hi = s.count
    while lo < hi, leading.contains(s[lo]) { lo += 1 }
    while hi > lo, trailing.contains(s[hi - 1]) { hi -= 1 }
    return Array(s[lo..<hi])
}

/// Python `re`'s `\w` for str patterns: `str.isalnum()` or "_". `isalnum` is `isalpha`
/// (general categories Lu, Ll, Lt, Lm, Lo) or `isnumeric` (any numeric type).
func isPythonWordScalar(_ c: Unicode.Scalar) -> Bool {
    if c == "_" { return true }
    switch c.properties.generalCategory {
    case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter:
        return true
    default:
        return c.properties.numericType != nil
    }
}

/// The last single-scalar match of `\b(X|Y|…)\b`: a letter with a non-word (or no)
/// neighbour on each side. Single-character matches cannot overlap, so scanning from the
/// end gives the same answer as Python's `findall(...)[-1]`.
private func lastStandaloneLetter(in s: [Unicode.Scalar], letters: Set<Unicode.Scalar>) -> Unicode.Scalar? {
    for i in s.indices.reversed() where letters.contains(s[i]) {
        let before = i == 0 || !isPythonWordScalar(s[i - 1])
        let after = i == s.count - 1 || !isPythonWordScalar(s[i + 1])
        if before && after { return s[i] }
    }
    return nil
}

// MARK: - Strict mode

/// End markers that survive decoding when special tokens are kept. Strict and open modes
/// expect text decoded without them but drop a trailing one so that either decoding works.
private let endMarkers = ["<|im_end|>", "<|endoftext|>"]

private func trimmedResponse(_ text: String) -> String {
    var s = text.trimmingCharacters(in: .whitespacesAndNewlines)
    var changed = true
    while changed {
        changed = false
        for marker in endMarkers where s.hasSuffix(marker) {
            s = String(s.dropLast(marker.count)).trimmingCharacters(in: .whitespacesAndNewlines)
            changed = true
        }
    }
    return s
}

/// Letters naming the options: "A", "B", … one per option; A–D when the options are unknown.
func optionLetters(count: Int) -> [String] {
    let n = count == 0 ? 4 : min(count, 26)
    return (0..<n).map { String(UnicodeScalar(UInt8(65 + $0))) }
}

/// Strict multiple-choice extraction. After trimming whitespace (and a trailing end
/// marker), the whole response must be exactly one of:
///
/// - a letter: `B`, `B.`, `B)`, `(B)`, `B:`
/// - a letter followed by one space and that letter's option text: `B. a cat`,
///   `B) a cat`, `(B) a cat`, `B: a cat`
/// - the option text alone: `a cat`
///
/// optionally preceded by `Answer:` (any case, spaces after the colon optional); a text may
/// end in one extra or one missing ".". Letters are upper-case only; option texts compare exactly
/// after trimming. Anything else — "B, a cat", "B or C", "b", a letter with the wrong option
/// text, an explanation — is invalid, so a response cannot hedge across options or pad an
/// answer with text to win votes. With no options only bare/wrapped letters A–D count.
/// Returns the option letter.
public func extractStrictAnswer(_ text: String, options: [String]) -> String? {
    var s = trimmedResponse(text)
    if s.lowercased().hasPrefix("answer:") {
        s = String(s.dropFirst("answer:".count)).trimmingCharacters(in: .whitespaces)
    }
    let letters = optionLetters(count: options.count)
    let texts = options.map { withoutFinalPeriod($0.trimmingCharacters(in: .whitespacesAndNewlines)) }

    let forms = letters.map { l in ["\(l)", "\(l).", "\(l))", "(\(l))", "\(l):"] }
    if let i = forms.firstIndex(where: { $0.contains(s) }) { return letters[i] }

    // Texts compare without one final "." on either side: "dog." answers "dog", and "3.5 m"
    // answers "3.5 m.".
    let body = withoutFinalPeriod(s)
    for (i, text) in texts.enumerated() where i < letters.count && !text.isEmpty {
        if forms[i].contains(where: { body == "\($0) \(text)" }) { return letters[i] }
    }
    let hits = texts.indices.filter { $0 < letters.count && !texts[$0].isEmpty && texts[$0] == body }
    // Duplicate option texts name no single letter.
    return hits.count == 1 ? letters[hits[0]] : nil
}

private func withoutFinalPeriod(_ s: String) -> String {
    s.hasSuffix(".") ? String(s.dropLast()) : s
}

// MARK: - Open mode

private let numberWords = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]
private let articles: Set<String> = ["a", "an", "the"]

/// VQA-style normalisation so that "Two dogs." and "2 dogs" vote together: lower-case,
/// apostrophes dropped ("don't" → "dont"), other punctuation and symbols turned into spaces
/// except a "." between digits ("3.5"), articles removed, number words zero…twenty turned
/// into digits, whitespace collapsed. Nil when nothing is left.
public func normalizeOpenAnswer(_ text: String) -> String? {
    let s = Array(trimmedResponse(text).lowercased().unicodeScalars)
    var out = String.UnicodeScalarView()
    for (i, c) in s.enumerated() {
        if c == "'" || c == "\u{2019}" { continue }
        if c == ".", i > 0, i + 1 < s.count,
           s[i - 1].properties.numericType != nil, s[i + 1].properties.numericType != nil {
            out.append(c)
            continue
        }
        switch c.properties.generalCategory {
        case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
             .initialPunctuation, .finalPunctuation, .otherPunctuation,
             .mathSymbol, .currencySymbol, .modifierSymbol, .otherSymbol:
            out.append(" ")
        default:
            out.append(c)
        }
    }
    let words = String(out).split(whereSeparator: { $0.isWhitespace }).map(String.init)
        .filter { !articles.contains($0) }
        .map { w in numberWords.firstIndex(of: w).map(String.init) ?? w }
    return words.isEmpty ? nil : words.joined(separator: " ")
}
