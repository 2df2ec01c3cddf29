import Foundation

public enum TokenizerError: Error, CustomStringConvertible {
    case invalid(String)
    case unsupported(String)

    public var description: String {
        switch self {
        case .invalid(let m): return "invalid tokenizer: \(m)"
        case .unsupported(let m): return "unsupported tokenizer feature: \(m)"
        }
    }
}

/// Byte-level BPE tokenizer matching HF `tokenizers` (GPT-2 / SmolLM2 / Qwen2 families).
///
/// Thread-safe: the only mutable state is the per-word BPE cache, guarded by a lock.
public final class Tokenizer: @unchecked Sendable {
    /// Pre-tokeniser stages, applied in order; each splits the pieces the previous one produced.
    enum Split: Equatable {
        case digits  // HF Digits(individual_digits: true): every \p{N} on its own
        case gpt2  // ByteLevel(use_regex: true)
        case qwen2  // Split(Qwen2 regex, Isolated)
    }

    struct AddedToken {
        let id: Int
        let bytes: [UInt8]
        let special: Bool
    }

    struct Merge {
        let rank: Int32
        let id: Int32
    }

    public let vocabSize: Int
    public var bosId: Int?
    public var eosId: Int?
    public var padId: Int?

    let vocab: [String: Int]
    let merges: [UInt64: Merge]
    let byteIds: [Int32]  // byte value -> id of its single-byte token, -1 if absent
    let splits: [Split]
    let nfc: Bool
    let ignoreMerges: Bool
    let added: [AddedToken]  // longest first, so the scan picks the longest match
    let addedFirstBytes: Set<UInt8>
    let specialFlags: [Bool]
    // Decoded bytes of every id, flattened: id i is decodedBytes[decodedStart[i]..<decodedStart[i+1]].
    let decodedBytes: [UInt8]
    let decodedStart: [Int]

    private var cache: [[UInt8]: [Int]] = [:]
    private let cacheLock = NSLock()
    private static let cacheLimit = 100_000

    // MARK: - Loading

    /// Loads an HF `tokenizer.json`. Special-token ids come from a sibling `tokenizer_config.json` when present.
    public convenience init(tokenizerJSON url: URL) throws {
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw TokenizerError.invalid("\(url.path): cannot read (\(error.localizedDescription))")
        }
        try self.init(tokenizerJSON: data, url: url)
    }

    /// Parses `tokenizer.json` bytes; `url` names the file in errors and locates `tokenizer_config.json`.
    public convenience init(tokenizerJSON data: Data, url: URL) throws {
        do {
            try self.init(parsing: data, url: url)
        } catch TokenizerError.invalid(let what) {
            throw TokenizerError.invalid("\(url.path): \(what)")
        } catch TokenizerError.unsupported(let what) {
            throw TokenizerError.unsupported("\(url.path): \(what)")
        }
    }

    private convenience init(parsing data: Data, url: URL) throws {
        func invalid(_ what: String) -> TokenizerError { .invalid(what) }
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: data)
        } catch {
            let detail = (error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String ?? "\(error)"
            throw invalid("not valid JSON (truncated?): \(detail)")
        }
        guard let root = json as? [String: Any], let model = root["model"] as? [String: Any]
        else { throw invalid("no model") }
        guard (model["type"] as? String ?? "BPE") == "BPE" else {
            throw TokenizerError.unsupported("model type \(model["type"] ?? "?")")
        }
        if model["byte_fallback"] as? Bool == true { throw TokenizerError.unsupported("byte_fallback") }
        guard let vocab = model["vocab"] as? [String: Int] else { throw invalid("model.vocab is not a map of token ids") }
        guard vocab.values.allSatisfy({ $0 >= 0 }) else { throw invalid("model.vocab has a negative id") }
        let merges: [(String, String)] = try (model["merges"] as? [Any] ?? []).map { entry in
            if let s = entry as? String, let space = s.firstIndex(of: " ") {
                return (String(s[..<space]), String(s[s.index(after: space)...]))
            }
            if let pair = entry as? [String], pair.count == 2 { return (pair[0], pair[1]) }
            throw invalid("merge \(entry)")
        }
        let added: [(content: String, id: Int, special: Bool)] = try (root["added_tokens"] as? [[String: Any]] ?? []).compactMap {
            guard let content = $0["content"] as? String, let id = $0["id"] as? Int else { return nil }
            guard id >= 0 else { throw invalid("added token id \(id) is negative") }
            return (content, id, $0["special"] as? Bool ?? false)
        }
        // Ids index dense tables, so one stray huge id would allocate for every id below it.
        let maxId = max(vocab.values.max() ?? -1, added.map(\.id).max() ?? -1)
        guard maxId < 2 * (vocab.count + added.count) + 1024 else {
            throw invalid("token id \(maxId) is far beyond the \(vocab.count + added.count) tokens listed")
        }
        let splits = try Tokenizer.parsePreTokenizer(root["pre_tokenizer"])
        let nfc = try Tokenizer.parseNormalizer(root["normalizer"])

        var tokens = [String](repeating: "", count: (vocab.values.max() ?? -1) + 1)
        for (token, id) in vocab { tokens[id] = token }
        try self.init(
            tokens: tokens, vocab: vocab, merges: merges, added: added, splits: splits, nfc: nfc,
            ignoreMerges: model["ignore_merges"] as? Bool ?? false)

        let configURL = url.deletingLastPathComponent().appendingPathComponent("tokenizer_config.json")
        if let configData = try? Data(contentsOf: configURL),
            let config = try? JSONSerialization.jsonObject(with: configData) as? [String: Any]
        {
            // Tokens may be given as plain strings or as serialized AddedToken objects.
            func tokenId(_ key: String) -> Int? {
                let value = config[key]
                let content = value as? String ?? (value as? [String: Any])?["content"] as? String
                return content.flatMap(id(of:))
            }
            bosId = tokenId("bos_token")
            eosId = tokenId("eos_token")
            padId = tokenId("pad_token")
        }
    }

    /// Builds from GGUF metadata arrays (`tokenizer.ggml.*`). Token types 3 (CONTROL) become special
    /// added tokens and 4 (USER_DEFINED) plain added tokens, as llama.cpp and transformers treat them.
    /// `nfc` defaults to what the family's own tokenizer.json does (Qwen2 normalises to NFC); llama.cpp
    /// and transformers' GGUF loader skip it, which only differs on non-NFC input.
    public convenience init(
        tokens: [String], merges: [String], tokenTypes: [Int]?, bosId: Int?, eosId: Int?, padId: Int?,
        preTokenizer: String, nfc: Bool? = nil
    ) throws {
        let splits: [Split]
        switch preTokenizer {
        case "gpt2", "default", "": splits = [.gpt2]
        // llama.cpp pre-tokenises these with \p{N} isolated before the GPT-2 regex.
        case "smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b": splits = [.digits, .gpt2]
        case "qwen2", "deepseek-r1-qwen", "megrez": splits = [.qwen2]
        default: throw TokenizerError.unsupported("GGUF pre-tokenizer \(preTokenizer)")
        }
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(tokens.count)
        for (id, token) in tokens.enumerated() where vocab[token] == nil { vocab[token] = id }
        let pairs: [(String, String)] = try merges.map { m in
            guard let space = m.firstIndex(of: " ") else { throw TokenizerError.invalid("merge \(m)") }
            return (String(m[..<space]), String(m[m.index(after: space)...]))
        }
        var added: [(content: String, id: Int, special: Bool)] = []
        for (id, type) in (tokenTypes ?? []).enumerated() where (type == 3 || type == 4) && id < tokens.count {
            added.append((tokens[id], id, type == 3))
        }
        try self.init(
            tokens: tokens, vocab: vocab, merges: pairs, added: added, splits: splits,
            nfc: nfc ?? splits.contains(.qwen2), ignoreMerges: false)
        self.bosId = bosId
        self.eosId = eosId
        self.padId = padId
    }

    private init(
        tokens: [String], vocab: [String: Int], merges: [(String, String)],
        added: [(content: String, id: Int, special: Bool)], splits: [Split], nfc: Bool, ignoreMerges: Bool
    ) throws {
        let size = max(tokens.count, (added.map(\.id).max() ?? -1) + 1)
        self.vocabSize = size
        self.vocab = vocab
        self.splits = splits
        self.nfc = nfc
        self.ignoreMerges = ignoreMerges

        var table: [UInt64: Merge] = [:]
        table.reserveCapacity(merges.count)
        for (rank, (a, b)) in merges.enumerated() {
            // Merges whose parts or result are missing can never fire; HF rejects them, GGUF files may have them.
            guard let ia = vocab[a], let ib = vocab[b], let iab = vocab[a + b] else { continue }
            table[UInt64(ia) << 32 | UInt64(ib)] = Merge(rank: Int32(rank), id: Int32(iab))
        }
        self.merges = table
        self.byteIds = ByteLevel.unicodeOf.map { vocab[String(Character($0))].map(Int32.init) ?? -1 }

        var tokenStrings = tokens + [String](repeating: "", count: size - tokens.count)
        var special = [Bool](repeating: false, count: size)
        for a in added {
            tokenStrings[a.id] = a.content
            special[a.id] = a.special
        }
        self.specialFlags = special
        self.added = added.map { AddedToken(id: $0.id, bytes: Array($0.content.utf8), special: $0.special) }
            .filter { !$0.bytes.isEmpty }
            .sorted { $0.bytes.count > $1.bytes.count }
        self.addedFirstBytes = Set(self.added.map { $0.bytes[0] })

        var bytes: [UInt8] = []
        bytes.reserveCapacity(size * 6)
        var starts = [Int](repeating: 0, count: size + 1)
        for (id, token) in tokenStrings.enumerated() {
            ByteLevel.decode(token, into: &bytes)
            starts[id + 1] = bytes.count
        }
        self.decodedBytes = bytes
        self.decodedStart = starts
    }

    static func parseNormalizer(_ any: Any?) throws -> Bool {
        guard let n = any as? [String: Any] else { return false }
        switch n["type"] as? String {
        case "NFC": return true
        case "Sequence":
            let parts = try (n["normalizers"] as? [Any] ?? []).map(parseNormalizer)
            guard parts.count <= 1 else { throw TokenizerError.unsupported("normalizer sequence") }
            return parts.first ?? false
        default: throw TokenizerError.unsupported("normalizer \(n["type"] ?? "?")")
        }
    }

    static func parsePreTokenizer(_ any: Any?) throws -> [Split] {
        guard let p = any as? [String: Any] else { return [] }
        switch p["type"] as? String {
        case "Sequence":
            return try (p["pretokenizers"] as? [Any] ?? []).flatMap(parsePreTokenizer)
        case "ByteLevel":
            if p["add_prefix_space"] as? Bool == true { throw TokenizerError.unsupported("ByteLevel add_prefix_space") }
            return p["use_regex"] as? Bool ?? true ? [.gpt2] : []
        case "Digits":
            guard p["individual_digits"] as? Bool == true else { throw TokenizerError.unsupported("Digits runs") }
            return [.digits]
        case "Split":
            let pattern = (p["pattern"] as? [String: Any])?["Regex"] as? String
            guard (p["behavior"] as? String) == "Isolated", p["invert"] as? Bool != true else {
                throw TokenizerError.unsupported("Split behaviour \(p["behavior"] ?? "?")")
            }
            switch pattern {
            case PreTokenizer.qwen2Pattern: return [.qwen2]
            case PreTokenizer.gpt2Pattern: return [.gpt2]
            default: throw TokenizerError.unsupported("Split regex \(pattern ?? "?")")
            }
        default:
            throw TokenizerError.unsupported("pre_tokenizer \(p["type"] ?? "?")")
        }
    }

    // MARK: - Encoding

    public func id(of token: String) -> Int? {
        if let a = added.first(where: { $0.bytes.elementsEqual(token.utf8) }) { return a.id }
        return vocab[token]
    }

    public func isSpecial(_ id: Int) -> Bool {
        id >= 0 && id < specialFlags.count && specialFlags[id]
    }

    /// `parseSpecial: false` treats special tokens in `text` as plain text (HF `encode_special_tokens`);
    /// non-special added tokens are still matched whole, as in HF.
    public func encode(_ text: String, parseSpecial: Bool = true) -> [Int] {
        var ids: [Int] = []
        let utf8 = Array(text.utf8)
        var segmentStart = 0
        var i = 0
        while i < utf8.count {
            if addedFirstBytes.contains(utf8[i]), let token = addedToken(at: i, in: utf8, parseSpecial: parseSpecial) {
                encodeSegment(utf8[segmentStart..<i], into: &ids)
                ids.append(token.id)
                i += token.bytes.count
                segmentStart = i
            } else {
                i += 1
            }
        }
        encodeSegment(utf8[segmentStart...], into: &ids)
        return ids
    }

    private func addedToken(at i: Int, in utf8: [UInt8], parseSpecial: Bool) -> AddedToken? {
        added.first { token in
            (parseSpecial || !token.special) && i + token.bytes.count <= utf8.count
                && utf8[i..<i + token.bytes.count].elementsEqual(token.bytes)
        }
    }

    private func encodeSegment(_ bytes: ArraySlice<UInt8>, into ids: inout [Int]) {
        guard !bytes.isEmpty else { return }
        var text = String(decoding: bytes, as: UTF8.self)
        // NFC leaves ASCII unchanged, so skip the Foundation call for it.
        if nfc && bytes.contains(where: { $0 >= 0x80 }) { text = text.precomposedStringWithCanonicalMapping }
        let scalars = Array(text.unicodeScalars)
        var pieces = [0..<scalars.count]
        for split in splits {
            pieces = pieces.flatMap { PreTokenizer.split(scalars, $0, split) }
        }
        var word: [UInt8] = []
        for piece in pieces {
            word.removeAll(keepingCapacity: true)
            for s in scalars[piece] { word.append(contentsOf: UTF8.encode(s)!) }
            ids.append(contentsOf: bpe(word))
        }
    }

    private func bpe(_ word: [UInt8]) -> [Int] {
        cacheLock.lock()
        let hit = cache[word]
        cacheLock.unlock()
        if let hit { return hit }

        let result = merge(word)
        cacheLock.lock()
        if cache.count >= Tokenizer.cacheLimit { cache.removeAll(keepingCapacity: true) }
        cache[word] = result
        cacheLock.unlock()
        return result
    }

    /// Applies the lowest-ranked merge everywhere it occurs, until none applies. With merges learned
    /// in order (a merge's parts exist before it), this equals HF's priority-queue algorithm.
    private func merge(_ word: [UInt8]) -> [Int] {
        if ignoreMerges, let id = vocab[ByteLevel.encode(word)] { return [id] }
        var symbols = word.compactMap { byteIds[Int($0)] >= 0 ? byteIds[Int($0)] : nil }
        while symbols.count > 1 {
            var best: Merge?
            var bestPair: UInt64 = 0
            for k in 0..<symbols.count - 1 {
                let pair = UInt64(symbols[k]) << 32 | UInt64(symbols[k + 1])
                if let m = merges[pair], m.rank < best?.rank ?? .max {
                    best = m
                    bestPair = pair
                }
            }
            guard let best else { break }
            let left = Int32(bestPair >> 32), right = Int32(bestPair & 0xFFFF_FFFF)
            var merged: [Int32] = []
            merged.reserveCapacity(symbols.count)
            var k = 0
            while k < symbols.count {
                if k + 1 < symbols.count && symbols[k] == left && symbols[k + 1] == right {
                    merged.append(best.id)
                    k += 2
                } else {
                    merged.append(symbols[k])
                    k += 1
                }
            }
            symbols = merged
        }
        return symbols.map(Int.init)
    }

    // MARK: - Decoding

    /// Bytes of one token as HF's ByteLevel decoder produces them (empty for unknown ids).
    public func bytes(of id: Int) -> ArraySlice<UInt8> {
        guard id >= 0 && id < vocabSize else { return [] }
        return decodedBytes[decodedStart[id]..<decodedStart[id + 1]]
    }

    /// Invalid UTF-8 (e.g. a cut multi-byte character) decodes to U+FFFD, like HF's `from_utf8_lossy`.
    public func decode(_ ids: [Int], skipSpecial: Bool = false) -> String {
        var out: [UInt8] = []
        for id in ids where !(skipSpecial && isSpecial(id)) { out.append(contentsOf: bytes(of: id)) }
        return String(decoding: out, as: UTF8.self)
    }
}

/// GPT-2's reversible byte <-> printable-character mapping.
enum ByteLevel {
    static let unicodeOf: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: "\0", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt32(b))!
            } else {
                table[b] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    static let byteOf: [UInt32: UInt8] = Dictionary(
        uniqueKeysWithValues: unicodeOf.enumerated().map { ($0.element.value, UInt8($0.offset)) })

    static func encode(_ bytes: [UInt8]) -> String {
        var s = String.UnicodeScalarView()
        for b in bytes { s.append(unicodeOf[Int(b)]) }
        return String(s)
    }

    /// A token with any character outside the mapping is emitted as its own UTF-8, as HF does
    /// (that is how added tokens like "<|im_end|>" come out).
    static func decode(_ token: String, into out: inout [UInt8]) {
        let start = out.count
        for s in token.unicodeScalars {
            guard let b = byteOf[s.value] else {
                out.removeSubrange(start...)
                out.append(contentsOf: token.utf8)
                return
            }
            out.append(b)
        }
    }
}

/// Hand-written scanners equivalent to the HF pre-tokeniser regexes (leftmost alternative wins, greedy,
/// with the backtracking that `\s+(?!\S)` implies). Each piece is scanned on its own, as HF does.
enum PreTokenizer {
    static let gpt2Pattern = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let qwen2Pattern =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    enum Class { case letter, number, space, other }

    static func classify(_ s: Unicode.Scalar) -> Class {
        if s.isASCII {
            switch s.value {
            case 0x41...0x5A, 0x61...0x7A: return .letter
            case 0x30...0x39: return .number
            case 0x09...0x0D, 0x20: return .space
            default: return .other
            }
        }
        let p = s.properties
        if p.isWhitespace { return .space }
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return .letter
        case .decimalNumber, .letterNumber, .otherNumber: return .number
        default: return .other
        }
    }

    static func split(_ s: [Unicode.Scalar], _ range: Range<Int>, _ kind: Tokenizer.Split) -> [Range<Int>] {
        let c = s[range].map(classify)
        let base = range.lowerBound
        var pieces: [Range<Int>] = []
        if kind == .digits {
            var start = 0
            for i in c.indices where c[i] == .number {
                if start < i { pieces.append(base + start..<base + i) }
                pieces.append(base + i..<base + i + 1)
                start = i + 1
            }
            if start < c.count { pieces.append(base + start..<base + c.count) }
            return pieces
        }
        let chars = Array(s[range])
        var i = 0
        while i < c.count {
            let end = kind == .gpt2 ? gpt2End(chars, c, i) : qwen2End(chars, c, i)
            pieces.append(base + i..<base + end)
            i = end
        }
        return pieces
    }

    /// Length of `'s|'t|'re|'ve|'m|'ll|'d` at `i` (0 if none).
    static func contraction(_ s: [Unicode.Scalar], _ i: Int, caseInsensitive: Bool) -> Int {
        guard s[i] == "'", i + 1 < s.count else { return 0 }
        func at(_ k: Int) -> Character? {
            guard k < s.count else { return nil }
            let ch = Character(s[k])
            // Under (?i), Oniguruma folds U+017F LONG S to "s".
            if caseInsensitive { return s[k] == "\u{17F}" ? "s" : ch.isASCII ? Character(ch.lowercased()) : ch }
            return ch
        }
        switch at(i + 1) {
        case "s", "t", "m", "d": return 2
        case "r", "v": return at(i + 2) == "e" ? 3 : 0
        case "l": return at(i + 2) == "l" ? 3 : 0
        default: return 0
        }
    }

    static func run(_ c: [Class], from i: Int, while cls: Class) -> Int {
        var j = i
        while j < c.count && c[j] == cls { j += 1 }
        return j
    }

    /// `\s+(?!\S)|\s+` at whitespace `i`: the run minus its last char when a non-space follows,
    /// so that char can lead the next word.
    static func whitespaceEnd(_ c: [Class], _ i: Int) -> Int {
        let j = run(c, from: i, while: .space)
        return j < c.count && j - 1 > i ? j - 1 : j
    }

    static func gpt2End(_ s: [Unicode.Scalar], _ c: [Class], _ i: Int) -> Int {
        let k = contraction(s, i, caseInsensitive: false)
        if k > 0 { return i + k }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let start = s[i] == " " && i + 1 < c.count && c[i + 1] != .space ? i + 1 : i
        if c[start] != .space { return run(c, from: start, while: c[start]) }
        return whitespaceEnd(c, i)
    }

    static func qwen2End(_ s: [Unicode.Scalar], _ c: [Class], _ i: Int) -> Int {
        let k = contraction(s, i, caseInsensitive: true)
        if k > 0 { return i + k }
        let isNewline = s[i] == "\r" || s[i] == "\n"
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if c[i] == .letter { return run(c, from: i, while: .letter) }
        if !isNewline && c[i] != .number && i + 1 < c.count && c[i + 1] == .letter {
            return run(c, from: i + 1, while: .letter)
        }
        // `\p{N}`
        if c[i] == .number { return i + 1 }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let start = s[i] == " " && i + 1 < c.count && c[i + 1] == .other ? i + 1 : i
        if c[start] == .other {
            var j = run(c, from: start, while: .other)
            while j < c.count && (s[j] == "\r" || s[j] == "\n") { j += 1 }
            return j
        }
        // `\s*[\r\n]+`: up to the last newline of the whitespace run.
        let j = run(c, from: i, while: .space)
        if let last = (i..<j).last(where: { s[$0] == "\r" || s[$0] == "\n" }) { return last + 1 }
        return whitespaceEnd(c, i)
    }
}

/// Feeds token ids one at a time and returns only complete UTF-8 text, holding back the bytes of a
/// character split across tokens. The concatenated output equals `decode` of all ids.
public struct StreamingDecoder {
    public let tokenizer: Tokenizer
    public let skipSpecial: Bool
    private var pending: [UInt8] = []

    public init(tokenizer: Tokenizer, skipSpecial: Bool = false) {
        self.tokenizer = tokenizer
        self.skipSpecial = skipSpecial
    }

    public mutating func push(_ id: Int) -> String {
        if skipSpecial && tokenizer.isSpecial(id) { return "" }
        pending.append(contentsOf: tokenizer.bytes(of: id))
        let cut = StreamingDecoder.completePrefix(pending)
        guard cut > 0 else { return "" }
        let text = String(decoding: pending[..<cut], as: UTF8.self)
        pending.removeSubrange(..<cut)
        return text
    }

    /// Emits whatever is held back (invalid leftovers become U+FFFD, as in `decode`).
    public mutating func flush() -> String {
        defer { pending.removeAll() }
        return String(decoding: pending, as: UTF8.self)
    }

    /// Bytes that can be decoded now: all but a trailing sequence that is a valid, unfinished character.
    /// Cutting before a lead byte never changes how a lossy decoder treats the bytes either side.
    static func completePrefix(_ b: [UInt8]) -> Int {
        var lead = b.count - 1
        while lead >= 0 && lead > b.count - 4 && b[lead] & 0xC0 == 0x80 { lead -= 1 }
        guard lead >= 0 else { return b.count }
        let first = b[lead]
        let need: Int
        switch first {
        case 0xC2...0xDF: need = 2
        case 0xE0...0xEF: need = 3
        case 0xF0...0xF4: need = 4
        default: return b.count
        }
        let have = b.count - lead
        guard have < need else { return b.count }
        if have >= 2 {
            // Second-byte limits that rule out overlongs, surrogates and > U+10FFFF.
            let second = b[lead + 1]
            let ok: ClosedRange<UInt8> =
                switch first {
                case 0xE0: 0xA0...0xBF
                case 0xED: 0x80...0x9F
                case 0xF0: 0x90...0xBF
                case 0xF4: 0x80...0x8F
                default: 0x80...0xBF
                }
            if !ok.contains(second) { return b.count }
        }
        return lead
    }
}
