import Foundation

// A small Jinja2 engine for chat templates: lexer and parser here, values and evaluation in
// JinjaRender.swift. It covers what the chat templates of published checkpoints use and fails,
// naming the construct, the file and the line:column, on anything else — a template is never
// rendered differently from Jinja2 in silence. Whitespace follows transformers' environment:
// trim_blocks and lstrip_blocks on, one trailing newline of the source dropped, `-` markers.

/// A line:column in a template's source (1-based).
struct JinjaPos: CustomStringConvertible {
    var line: Int, column: Int
    var description: String { "\(line):\(column)" }
}

// MARK: - Lexer

enum JinjaTok: Equatable {
    case text(String)
    case outputBegin, outputEnd, blockBegin, blockEnd
    case name(String), string(String), int(Int), double(Double)
    /// Operators and punctuation: + - * / // % ** ~ == != < <= > >= = ( ) [ ] { } . , : |
    case op(String)
    case end
}

struct JinjaLexer {
    let s: [Unicode.Scalar]
    let file: String
    var i = 0
    var line = 1, col = 1
    var out: [(tok: JinjaTok, pos: JinjaPos)] = []
    /// Where the last tag's closer (`}}`, `%}`) starts.
    var closerPos = JinjaPos(line: 1, column: 1)

    init(source: String, file: String) {
        // Like Jinja2: newlines normalised to \n and one trailing newline dropped.
        var text = source.replacingOccurrences(of: "\r\n", with: "\n").replacingOccurrences(of: "\r", with: "\n")
        if text.hasSuffix("\n") { text.removeLast() }
        s = Array(text.unicodeScalars)
        self.file = file
    }

    var pos: JinjaPos { JinjaPos(line: line, column: col) }

    func fail(_ message: String, at p: JinjaPos) -> ModelError { ModelError("\(file):\(p): \(message)") }

    func peek(_ k: Int = 0) -> Unicode.Scalar? { i + k < s.count ? s[i + k] : nil }

    mutating func advance(_ n: Int = 1) {
        for _ in 0..<n where i < s.count {
            if s[i] == "\n" { line += 1; col = 1 } else { col += 1 }
            i += 1
        }
    }

    static func isSpace(_ c: Unicode.Scalar) -> Bool { c.properties.isWhitespace }

    mutating func tokenize() throws -> [(tok: JinjaTok, pos: JinjaPos)] {
        var text = "", textPos = pos
        var stripNextText = false   // a `-` closed the previous tag
        var trimNewline = false     // trim_blocks after `%}` / `#}`
        var lineStarting = true     // the text so far starts a line (for lstrip_blocks)
        func flush(_ t: inout String, _ p: JinjaPos, into out: inout [(tok: JinjaTok, pos: JinjaPos)]) {
            if !t.isEmpty { out.append((.text(t), p)) }
            t = ""
        }
        while i < s.count {
            let c = s[i]
            if c == "{", let n = peek(1), n == "{" || n == "%" || n == "#" {
                let tagPos = pos
                let sign = peek(2)
                // Whitespace control on the text before the tag.
                if sign == "-" {
                    while let last = text.unicodeScalars.last, Self.isSpace(last) { text.unicodeScalars.removeLast() }
                } else if sign != "+", n != "{" {
                    let tail = text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false).last ?? []
                    let atLineStart = text.unicodeScalars.contains("\n") || lineStarting
                    if atLineStart, !tail.isEmpty, tail.allSatisfy({ $0 == " " || $0 == "\t" || Self.isSpace($0) }) {
                        text.unicodeScalars.removeLast(tail.count)
                    }
                }
                flush(&text, textPos, into: &out)
                advance(sign == "-" || sign == "+" ? 3 : 2)
                let closer: (strip: Bool, trimBlocks: Bool)
                switch n {
                case "#": closer = try skipComment(from: tagPos)
                case "{":
                    out.append((.outputBegin, tagPos))
                    closer = try lexTag(closing: "}", from: tagPos)
                    out.append((.outputEnd, closerPos))
                default:
                    out.append((.blockBegin, tagPos))
                    closer = try lexTag(closing: "%", from: tagPos)
                    out.append((.blockEnd, closerPos))
                }
                stripNextText = closer.strip
                trimNewline = n != "{" && closer.trimBlocks
                lineStarting = false
                textPos = pos
                if stripNextText {
                    while let ch = peek(), Self.isSpace(ch) {
                        lineStarting = ch == "\n"
                        advance()
                    }
                } else if trimNewline, peek() == "\n" {
                    advance()
                    lineStarting = true
                }
                textPos = pos
                continue
            }
            if text.isEmpty { textPos = pos }
            text.unicodeScalars.append(c)
            advance()
        }
        flush(&text, textPos, into: &out)
        out.append((.end, pos))
        return out
    }

    /// Skips to `#}`; returns the closer's whitespace flags.
    mutating func skipComment(from start: JinjaPos) throws -> (strip: Bool, trimBlocks: Bool) {
        while i < s.count {
            if s[i] == "#", peek(1) == "}" {
                let sign = i > 0 ? s[i - 1] : " "
                advance(2)
                return (sign == "-", sign != "+")
            }
            advance()
        }
        throw fail("comment is not closed (missing #})", at: start)
    }

    /// Tokens inside `{{ … }}` (closing "}") or `{% … %}` (closing "%") up to the closer.
    mutating func lexTag(closing: Unicode.Scalar, from start: JinjaPos) throws -> (strip: Bool, trimBlocks: Bool) {
        var depth = 0
        while true {
            while let c = peek(), Self.isSpace(c) { advance() }
            guard let c = peek() else { throw fail("tag is not closed (missing \(closing)})", at: start) }
            let p = pos
            closerPos = p
            if depth == 0, (c == "-" || c == "+"), peek(1) == closing, peek(2) == "}" {
                advance(3)
                return (c == "-", c != "+")
            }
            if depth == 0, c == closing, peek(1) == "}" {
                advance(2)
                return (false, true)
            }
            if c == "'" || c == "\"" {
                out.append((.string(try lexString(quote: c)), p))
            } else if c.properties.numericType != nil, c.isASCII {
                out.append((lexNumber(), p))
            } else if c == "_" || (c.isASCII && c.properties.isAlphabetic) {
                var name = ""
                while let d = peek(), d == "_" || (d.isASCII && (d.properties.isAlphabetic || d.properties.numericType != nil)) {
                    name.unicodeScalars.append(d)
                    advance()
                }
                out.append((.name(name), p))
            } else {
                let two = peek(1).map { String(c) + String($0) } ?? ""
                if ["//", "**", "==", "!=", "<=", ">="].contains(two) {
                    out.append((.op(two), p))
                    advance(2)
                } else if "+-*/%~<>=()[]{}.,:|".unicodeScalars.contains(c) {
                    if "([{".unicodeScalars.contains(c) { depth += 1 }
                    if ")]}".unicodeScalars.contains(c) { depth -= 1 }
                    out.append((.op(String(c)), p))
                    advance()
                } else {
                    throw fail("unexpected character '\(c)' in a tag", at: p)
                }
            }
        }
    }

    mutating func lexNumber() -> JinjaTok {
        var digits = ""
        func take() {
            while let d = peek(), d.isASCII, d.properties.numericType != nil || d == "_" {
                if d != "_" { digits.unicodeScalars.append(d) }
                advance()
            }
        }
        take()
        var isFloat = false
        if peek() == ".", let d = peek(1), d.isASCII, d.properties.numericType != nil {
            digits += "."
            advance()
            take()
            isFloat = true
        }
        // An exponent: 1e-5, 2.5E3.
        if let e = peek(), e == "e" || e == "E" {
            let sign = peek(1) == "+" || peek(1) == "-" ? 1 : 0
            if let d = peek(1 + sign), d.isASCII, d.properties.numericType != nil {
                digits += "e" + (sign == 1 ? String(peek(1)!) : "")
                advance(1 + sign)
                take()
                isFloat = true
            }
        }
        return isFloat ? .double(Double(digits) ?? 0) : .int(Int(digits) ?? 0)
    }

    /// A quoted string with Python's escapes (Jinja2 decodes literals with "unicode-escape").
    mutating func lexString(quote: Unicode.Scalar) throws -> String {
        let start = pos
        advance()
        var v = String.UnicodeScalarView()
        while let c = peek() {
            advance()
            if c == quote { return String(v) }
            guard c == "\\", let e = peek() else { v.append(c); continue }
            advance()
            switch e {
            case "n": v.append("\n")
            case "t": v.append("\t")
            case "r": v.append("\r")
            case "0": v.append("\0")
            case "a": v.append("\u{07}")
            case "b": v.append("\u{08}")
            case "f": v.append("\u{0C}")
            case "v": v.append("\u{0B}")
            case "\\", "'", "\"": v.append(e)
            case "\n": break
            case "x", "u", "U":
                let n = e == "x" ? 2 : e == "u" ? 4 : 8
                var hex = ""
                for _ in 0..<n { if let h = peek() { hex.unicodeScalars.append(h); advance() } }
                guard let code = UInt32(hex, radix: 16), let scalar = Unicode.Scalar(code) else {
                    throw fail("bad \\\(e) escape in a string", at: start)
                }
                v.append(scalar)
            default:
                v.append("\\")
                v.append(e)
            }
        }
        throw fail("string is not closed", at: start)
    }
}

// MARK: - Syntax tree

final class JinjaExpr {
    indirect enum Kind {
        case literal(JinjaValue)
        case name(String)
        case list([JinjaExpr])
        case dict([(JinjaExpr, JinjaExpr)])
        case attr(JinjaExpr, String)
        case item(JinjaExpr, JinjaExpr)
        case slice(JinjaExpr, JinjaExpr?, JinjaExpr?, JinjaExpr?)
        case call(JinjaExpr, [JinjaExpr], [(String, JinjaExpr)])
        case filter(JinjaExpr, String, [JinjaExpr], [(String, JinjaExpr)])
        case test(JinjaExpr, String, [JinjaExpr], negated: Bool)
        case not(JinjaExpr)
        case neg(JinjaExpr)
        case binary(String, JinjaExpr, JinjaExpr)
        case and(JinjaExpr, JinjaExpr)
        case or(JinjaExpr, JinjaExpr)
        /// Chained comparisons: a < b <= c.
        case compare(JinjaExpr, [(String, JinjaExpr)])
        case conditional(then: JinjaExpr, cond: JinjaExpr, otherwise: JinjaExpr?)
    }
    let kind: Kind
    let pos: JinjaPos
    /// Longest path to a leaf: evaluating and freeing the tree recurse this deep.
    let height: Int
    init(_ kind: Kind, _ pos: JinjaPos) {
        self.kind = kind
        self.pos = pos
        height = 1 + (Self.children(kind).map(\.height).max() ?? 0)
    }

    /// Whether evaluating this node may build a new value (a call, filter, operator or literal list).
    var builds: Bool {
        switch kind {
        case .call, .filter, .binary, .list, .slice: return true
        default: return false
        }
    }

    static func children(_ kind: Kind) -> [JinjaExpr] {
        switch kind {
        case .literal, .name: return []
        case .list(let items): return items
        case .dict(let pairs): return pairs.flatMap { [$0.0, $0.1] }
        case .attr(let e, _), .not(let e), .neg(let e): return [e]
        case .item(let a, let b), .binary(_, let a, let b), .and(let a, let b), .or(let a, let b): return [a, b]
        case .slice(let e, let a, let b, let c): return [e] + [a, b, c].compactMap { $0 }
        case .call(let f, let args, let kwargs), .filter(let f, _, let args, let kwargs):
            return [f] + args + kwargs.map(\.1)
        case .test(let e, _, let args, _): return [e] + args
        case .compare(let first, let ops): return [first] + ops.map(\.1)
        case .conditional(let a, let b, let c): return [a, b] + (c.map { [$0] } ?? [])
        }
    }
}

indirect enum JinjaNode {
    case text(String)
    case output(JinjaExpr)
    case ifChain([(JinjaExpr, [JinjaNode])], otherwise: [JinjaNode])
    case forLoop(targets: [String], iterable: JinjaExpr, filter: JinjaExpr?, body: [JinjaNode], otherwise: [JinjaNode], JinjaPos)
    case set(targets: [String], JinjaExpr, JinjaPos)
    case setAttr(object: String, attr: String, JinjaExpr, JinjaPos)
    case setBlock(String, [JinjaNode])
    case macro(name: String, params: [(String, JinjaExpr?)], body: [JinjaNode])
    case breakLoop, continueLoop
}

// MARK: - Parser

struct JinjaParser {
    let toks: [(tok: JinjaTok, pos: JinjaPos)]
    let file: String
    var k = 0
    /// Open blocks and sub-expressions: a hostile template nests thousands deep to exhaust the stack.
    var depth = 0
    static let maxDepth = 100

    static let filters: Set<String> = [
        "trim", "tojson", "length", "count", "upper", "lower", "capitalize", "title", "replace", "default", "d",
        "first", "last", "join", "map", "select", "reject", "selectattr", "rejectattr", "items", "list", "string",
        "int", "float", "abs", "reverse", "safe", "unique", "sort", "min", "max", "sum", "round", "indent", "wordcount",
        "dictsort", "escape", "e",
    ]
    static let tests: Set<String> = [
        "defined", "undefined", "none", "string", "number", "integer", "float", "boolean", "true", "false",
        "mapping", "iterable", "sequence", "callable", "eq", "equalto", "==", "ne", "!=", "lt", "<", "gt", ">",
        "le", "<=", "ge", ">=", "odd", "even", "divisibleby", "in", "sameas", "lower", "upper",
    ]

    var cur: JinjaTok { toks[k].tok }
    var curPos: JinjaPos { toks[k].pos }

    func fail(_ message: String, at p: JinjaPos? = nil) -> ModelError {
        ModelError("\(file):\(p ?? curPos): \(message)")
    }

    mutating func next() { if k < toks.count - 1 { k += 1 } }

    /// An expression node, refused when the tree grows deeper than `maxDepth` (long chains such as
    /// `a+a+a+…` or `x.y.y.y…` deepen it without nesting brackets).
    func node(_ kind: JinjaExpr.Kind, _ p: JinjaPos) throws -> JinjaExpr {
        let e = JinjaExpr(kind, p)
        guard e.height <= Self.maxDepth else {
            throw fail("the expression nests deeper than \(Self.maxDepth) levels", at: p)
        }
        return e
    }

    /// Runs `body` one nesting level deeper, refusing templates nested deeper than `maxDepth`.
    mutating func nested<T>(_ body: (inout JinjaParser) throws -> T) throws -> T {
        guard depth < Self.maxDepth else { throw fail("the template nests deeper than \(Self.maxDepth) levels") }
        depth += 1
        defer { depth -= 1 }
        return try body(&self)
    }

    func isOp(_ o: String) -> Bool { cur == .op(o) }
    func isName(_ n: String) -> Bool { cur == .name(n) }

    mutating func expectOp(_ o: String) throws {
        guard isOp(o) else { throw fail("expected '\(o)', found \(describe(cur))") }
        next()
    }

    mutating func expectName() throws -> String {
        guard case .name(let n) = cur else { throw fail("expected a name, found \(describe(cur))") }
        next()
        return n
    }

    func describe(_ t: JinjaTok) -> String {
        switch t {
        case .text: return "text"
        case .outputBegin: return "'{{'"
        case .outputEnd: return "'}}'"
        case .blockBegin: return "'{%'"
        case .blockEnd: return "'%}'"
        case .name(let n): return "'\(n)'"
        case .string(let s): return "string '\(s)'"
        case .int(let v): return "\(v)"
        case .double(let v): return "\(v)"
        case .op(let o): return "'\(o)'"
        case .end: return "the end of the template"
        }
    }

    // MARK: statements

    /// Nodes up to one of `ends` (a block tag name); returns the nodes and the end tag found
    /// (its `%}` not yet consumed), or nil at the end of the template when `ends` is empty.
    mutating func parseBody(until ends: Set<String>, opened: (String, JinjaPos)? = nil) throws -> ([JinjaNode], String?) {
        try nested { try $0.parseBodyNodes(until: ends, opened: opened) }
    }

    mutating func parseBodyNodes(until ends: Set<String>, opened: (String, JinjaPos)?) throws -> ([JinjaNode], String?) {
        var nodes: [JinjaNode] = []
        while true {
            switch cur {
            case .end:
                if let (tag, p) = opened { throw fail("'\(tag)' is not closed (no {% end\(tag) %})", at: p) }
                return (nodes, nil)
            case .text(let t):
                nodes.append(.text(t))
                next()
            case .outputBegin:
                next()
                let e = try parseExpression()
                guard cur == .outputEnd else { throw fail("expected '}}', found \(describe(cur))") }
                next()
                nodes.append(.output(e))
            case .blockBegin:
                let tagPos = curPos
                next()
                guard case .name(let tag) = cur else { throw fail("expected a tag name, found \(describe(cur))") }
                if ends.contains(tag) {
                    next()
                    return (nodes, tag)
                }
                next()
                if let n = try parseStatement(tag, at: tagPos) { nodes.append(n) }
            default:
                throw fail("unexpected \(describe(cur))")
            }
        }
    }

    mutating func endTag() throws {
        guard cur == .blockEnd else { throw fail("expected '%}', found \(describe(cur))") }
        next()
    }

    mutating func parseStatement(_ tag: String, at p: JinjaPos) throws -> JinjaNode? {
        switch tag {
        case "if": return try parseIf(at: p)
        case "for": return try parseFor(at: p)
        case "set": return try parseSet(at: p)
        case "macro": return try parseMacro(at: p)
        case "break", "continue":
            try endTag()
            return tag == "break" ? .breakLoop : .continueLoop
        case "generation":
            // transformers' AssistantTracker tag: marks assistant text, renders its body unchanged.
            try endTag()
            let (body, _) = try parseBody(until: ["endgeneration"], opened: (tag, p))
            try endTag()
            return .ifChain([(try node(.literal(.bool(true)), p), body)], otherwise: [])
        default:
            throw fail("unsupported tag '\(tag)'", at: p)
        }
    }

    mutating func parseIf(at p: JinjaPos) throws -> JinjaNode {
        var branches: [(JinjaExpr, [JinjaNode])] = []
        var cond = try parseExpression()
        while true {
            try endTag()
            let (body, end) = try parseBody(until: ["elif", "else", "endif"], opened: ("if", p))
            branches.append((cond, body))
            switch end {
            case "elif": cond = try parseExpression()
            case "else":
                try endTag()
                let (otherwise, _) = try parseBody(until: ["endif"], opened: ("if", p))
                try endTag()
                return .ifChain(branches, otherwise: otherwise)
            default:
                try endTag()
                return .ifChain(branches, otherwise: [])
            }
        }
    }

    mutating func parseFor(at p: JinjaPos) throws -> JinjaNode {
        var targets: [String] = []
        let paren = isOp("(")
        if paren { next() }
        repeat {
            if isOp(",") { next() }
            targets.append(try expectName())
        } while isOp(",")
        if paren { try expectOp(")") }
        guard isName("in") else { throw fail("expected 'in' in a for loop, found \(describe(cur))") }
        next()
        let iterable = try parseOr()
        var filter: JinjaExpr?
        if isName("if") {
            next()
            filter = try parseExpression()
        }
        if isName("recursive") { throw fail("unsupported: recursive for loops") }
        try endTag()
        let (body, end) = try parseBody(until: ["else", "endfor"], opened: ("for", p))
        var otherwise: [JinjaNode] = []
        if end == "else" {
            try endTag()
            (otherwise, _) = try parseBody(until: ["endfor"], opened: ("for", p))
        }
        try endTag()
        return .forLoop(targets: targets, iterable: iterable, filter: filter, body: body, otherwise: otherwise, p)
    }

    mutating func parseSet(at p: JinjaPos) throws -> JinjaNode {
        let first = try expectName()
        if isOp(".") {
            next()
            let attr = try expectName()
            try expectOp("=")
            let value = try parseExpression()
            try endTag()
            return .setAttr(object: first, attr: attr, value, p)
        }
        var targets = [first]
        while isOp(",") {
            next()
            targets.append(try expectName())
        }
        if isOp("=") {
            next()
            var value = try parseExpression()
            if isOp(",") {  // `set a, b = x, y`: the right side is a tuple
                var items = [value]
                while isOp(",") {
                    next()
                    items.append(try parseExpression())
                }
                value = try node(.list(items), value.pos)
            }
            try endTag()
            return .set(targets: targets, value, p)
        }
        guard targets.count == 1 else { throw fail("a block set takes one name", at: p) }
        if isOp("|") { throw fail("unsupported: filters on a block set", at: p) }
        try endTag()
        let (body, _) = try parseBody(until: ["endset"], opened: ("set", p))
        try endTag()
        return .setBlock(first, body)
    }

    mutating func parseMacro(at p: JinjaPos) throws -> JinjaNode {
        let name = try expectName()
        try expectOp("(")
        var params: [(String, JinjaExpr?)] = []
        while !isOp(")") {
            let param = try expectName()
            var def: JinjaExpr?
            if isOp("=") {
                next()
                def = try parseExpression()
            }
            params.append((param, def))
            if !isOp(")") { try expectOp(",") }
        }
        next()
        try endTag()
        let (body, _) = try parseBody(until: ["endmacro"], opened: ("macro", p))
        try endTag()
        return .macro(name: name, params: params, body: body)
    }

    // MARK: expressions (Jinja2's precedence, lowest first)

    mutating func parseExpression() throws -> JinjaExpr { try nested { try $0.parseConditional() } }

    mutating func parseConditional() throws -> JinjaExpr {
        let p = curPos
        let e = try parseOr()
        guard isName("if") else { return e }
        next()
        let cond = try parseOr()
        var otherwise: JinjaExpr?
        if isName("else") {
            next()
            otherwise = try parseExpression()
        }
        return try node(.conditional(then: e, cond: cond, otherwise: otherwise), p)
    }

    mutating func parseOr() throws -> JinjaExpr {
        var e = try parseAnd()
        while isName("or") {
            let p = curPos
            next()
            e = try node(.or(e, try parseAnd()), p)
        }
        return e
    }

    mutating func parseAnd() throws -> JinjaExpr {
        var e = try parseNot()
        while isName("and") {
            let p = curPos
            next()
            e = try node(.and(e, try parseNot()), p)
        }
        return e
    }

    mutating func parseNot() throws -> JinjaExpr {
        guard isName("not") else { return try parseCompare() }
        let p = curPos
        next()
        return try node(.not(try nested { try $0.parseNot() }), p)
    }

    mutating func parseCompare() throws -> JinjaExpr {
        let p = curPos
        let first = try parseMath1()
        var ops: [(String, JinjaExpr)] = []
        while true {
            if case .op(let o) = cur, ["==", "!=", "<", "<=", ">", ">="].contains(o) {
                next()
                ops.append((o, try parseMath1()))
            } else if isName("in") {
                next()
                ops.append(("in", try parseMath1()))
            } else if isName("not"), k + 1 < toks.count, toks[k + 1].tok == .name("in") {
                next()
                next()
                ops.append(("not in", try parseMath1()))
            } else {
                break
            }
        }
        return ops.isEmpty ? first : try node(.compare(first, ops), p)
    }

    mutating func parseBinary(_ ops: [String], _ operand: (inout JinjaParser) throws -> JinjaExpr) throws -> JinjaExpr {
        var e = try operand(&self)
        while case .op(let o) = cur, ops.contains(o) {
            let p = curPos
            next()
            e = try node(.binary(o, e, try operand(&self)), p)
        }
        return e
    }

    mutating func parseMath1() throws -> JinjaExpr { try parseBinary(["+", "-"]) { try $0.parseConcat() } }
    mutating func parseConcat() throws -> JinjaExpr { try parseBinary(["~"]) { try $0.parseMath2() } }
    mutating func parseMath2() throws -> JinjaExpr { try parseBinary(["*", "/", "//", "%"]) { try $0.parsePow() } }
    mutating func parsePow() throws -> JinjaExpr { try parseBinary(["**"]) { try $0.parseUnary(withFilter: true) } }

    mutating func parseUnary(withFilter: Bool) throws -> JinjaExpr {
        let p = curPos
        var e: JinjaExpr
        if isOp("-") {
            next()
            e = try node(.neg(try nested { try $0.parseUnary(withFilter: false) }), p)
        } else if isOp("+") {
            next()
            e = try nested { try $0.parseUnary(withFilter: false) }
        } else {
            e = try parsePrimary()
        }
        e = try parsePostfix(e)
        return withFilter ? try parseFilters(e) : e
    }

    mutating func parsePrimary() throws -> JinjaExpr {
        let p = curPos
        switch cur {
        case .name(let n):
            next()
            switch n {
            case "true", "True": return try node(.literal(.bool(true)), p)
            case "false", "False": return try node(.literal(.bool(false)), p)
            case "none", "None": return try node(.literal(.none), p)
            default: return try node(.name(n), p)
            }
        case .string(var s):
            next()
            while case .string(let more) = cur {  // adjacent literals concatenate
                s += more
                next()
            }
            return try node(.literal(.string(s)), p)
        case .int(let v):
            next()
            return try node(.literal(.int(v)), p)
        case .double(let v):
            next()
            return try node(.literal(.double(v)), p)
        case .op("("):
            next()
            if isOp(")") {
                next()
                return try node(.list([]), p)
            }
            let e = try parseExpression()
            if isOp(",") {  // a tuple, which behaves as a list here
                var items = [e]
                while isOp(",") {
                    next()
                    if isOp(")") { break }
                    items.append(try parseExpression())
                }
                try expectOp(")")
                return try node(.list(items), p)
            }
            try expectOp(")")
            return e
        case .op("["):
            next()
            var items: [JinjaExpr] = []
            while !isOp("]") {
                items.append(try parseExpression())
                if !isOp("]") { try expectOp(",") }
            }
            next()
            return try node(.list(items), p)
        case .op("{"):
            next()
            var pairs: [(JinjaExpr, JinjaExpr)] = []
            while !isOp("}") {
                let key = try parseExpression()
                try expectOp(":")
                pairs.append((key, try parseExpression()))
                if !isOp("}") { try expectOp(",") }
            }
            next()
            return try node(.dict(pairs), p)
        default:
            throw fail("unexpected \(describe(cur)) in an expression")
        }
    }

    mutating func parsePostfix(_ base: JinjaExpr) throws -> JinjaExpr {
        var e = base
        while true {
            let p = curPos
            if isOp(".") {
                next()
                switch cur {
                case .name(let n):
                    next()
                    e = try node(.attr(e, n), p)
                case .int(let v):
                    next()
                    e = try node(.item(e, try node(.literal(.int(v)), p)), p)
                default: throw fail("expected an attribute name after '.', found \(describe(cur))")
                }
            } else if isOp("[") {
                next()
                e = try parseSubscript(e, at: p)
            } else if isOp("(") {
                let (args, kwargs) = try parseCallArgs()
                e = try node(.call(e, args, kwargs), p)
            } else {
                return e
            }
        }
    }

    mutating func parseSubscript(_ base: JinjaExpr, at p: JinjaPos) throws -> JinjaExpr {
        var parts: [JinjaExpr?] = [nil]
        var isSlice = false
        while !isOp("]") {
            if isOp(":") {
                isSlice = true
                parts.append(nil)
                next()
                continue
            }
            guard parts[parts.count - 1] == nil else { throw fail("expected ']' or ':', found \(describe(cur))") }
            parts[parts.count - 1] = try parseExpression()
        }
        next()
        guard isSlice else {
            guard let index = parts[0] else { throw fail("empty subscript", at: p) }
            return try node(.item(base, index), p)
        }
        guard parts.count <= 3 else { throw fail("a slice takes at most three parts", at: p) }
        while parts.count < 3 { parts.append(nil) }
        return try node(.slice(base, parts[0], parts[1], parts[2]), p)
    }

    mutating func parseCallArgs() throws -> ([JinjaExpr], [(String, JinjaExpr)]) {
        try expectOp("(")
        var args: [JinjaExpr] = [], kwargs: [(String, JinjaExpr)] = []
        while !isOp(")") {
            if isOp("*") || isOp("**") { throw fail("unsupported: * and ** arguments") }
            if case .name(let n) = cur, k + 1 < toks.count, toks[k + 1].tok == .op("=") {
                next()
                next()
                kwargs.append((n, try parseExpression()))
            } else {
                guard kwargs.isEmpty else { throw fail("a positional argument follows a keyword argument") }
                args.append(try parseExpression())
            }
            if !isOp(")") { try expectOp(",") }
        }
        next()
        return (args, kwargs)
    }

    mutating func parseFilters(_ base: JinjaExpr) throws -> JinjaExpr {
        var e = base
        while true {
            let p = curPos
            if isOp("|") {
                next()
                let namePos = curPos
                let name = try expectName()
                guard Self.filters.contains(name) else { throw fail("unsupported filter '\(name)'", at: namePos) }
                var args: [JinjaExpr] = [], kwargs: [(String, JinjaExpr)] = []
                if isOp("(") { (args, kwargs) = try parseCallArgs() }
                e = try node(.filter(e, name, args, kwargs), p)
            } else if isName("is") {
                next()
                var negated = false
                if isName("not") {
                    negated = true
                    next()
                }
                let namePos = curPos
                let name: String
                switch cur {
                case .name(let n): name = n
                case .op(let o) where ["==", "!=", "<", "<=", ">", ">="].contains(o): name = o
                default: throw fail("expected a test name after 'is', found \(describe(cur))")
                }
                next()
                guard Self.tests.contains(name) else { throw fail("unsupported test '\(name)'", at: namePos) }
                var args: [JinjaExpr] = []
                if isOp("(") {
                    let (a, kw) = try parseCallArgs()
                    guard kw.isEmpty else { throw fail("test '\(name)' takes no keyword arguments", at: namePos) }
                    args = a
                } else if startsPrimary(), !isName("else"), !isName("or"), !isName("and") {
                    if isName("is") { throw fail("cannot chain tests with 'is'") }
                    args = [try parsePostfix(try parsePrimary())]
                }
                e = try node(.test(e, name, args, negated: negated), p)
            } else if isOp("(") {
                let (args, kwargs) = try parseCallArgs()
                e = try node(.call(e, args, kwargs), p)
            } else {
                return e
            }
        }
    }

    func startsPrimary() -> Bool {
        switch cur {
        case .name, .string, .int, .double: return true
        case .op(let o): return o == "(" || o == "[" || o == "{"
        default: return false
        }
    }
}
