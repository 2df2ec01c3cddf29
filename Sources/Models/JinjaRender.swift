import Foundation

// Values and evaluation for the Jinja engine (see JinjaParse.swift). Values behave as Python's do
// under Jinja2: `str()` and `repr()` spellings, truthiness, `==` across int/float/bool, undefined
// names and missing keys that render empty but fail when used further.

/// A dictionary that keeps insertion order, as Python's does (tojson and `items()` depend on it).
public struct JinjaDict: Sendable {
    public private(set) var keys: [String] = []
    private var storage: [String: JinjaValue] = [:]

    public init(_ pairs: [(String, JinjaValue)] = []) {
        for (k, v) in pairs { self[k] = v }
    }

    public subscript(key: String) -> JinjaValue? {
        get { storage[key] }
        set {
            if storage[key] == nil, newValue != nil { keys.append(key) }
            if newValue == nil { keys.removeAll { $0 == key } }
            storage[key] = newValue
        }
    }

    public var pairs: [(String, JinjaValue)] { keys.map { ($0, storage[$0]!) } }
}

/// `namespace(...)`: the one mutable object a template may assign attributes on.
public final class JinjaNamespace: @unchecked Sendable {
    var values: JinjaDict
    init(_ values: JinjaDict) { self.values = values }
}

public struct JinjaFunction: @unchecked Sendable {
    let name: String
    let call: ([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue
}

public indirect enum JinjaValue: Sendable {
    /// An undefined name or missing key; the text says what was looked up (for errors).
    case undefined(String)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case list([JinjaValue])
    case dict(JinjaDict)
    case namespace(JinjaNamespace)
    case function(JinjaFunction)

    var isUndefined: Bool { if case .undefined = self { return true } else { return false } }

    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case .bool(let b): return b
        case .int(let v): return v != 0
        case .double(let v): return v != 0
        case .string(let s): return !s.isEmpty
        case .list(let l): return !l.isEmpty
        case .dict(let d): return !d.keys.isEmpty
        case .namespace, .function: return true
        }
    }

    /// Python's str(): what `{{ x }}` prints.
    var str: String {
        switch self {
        case .undefined: return ""
        case .string(let s): return s
        default: return repr
        }
    }

    /// Python's repr(), used inside printed lists and dicts.
    var repr: String {
        switch self {
        case .undefined: return ""
        case .none: return "None"
        case .bool(let b): return b ? "True" : "False"
        case .int(let v): return String(v)
        case .double(let v): return Self.pythonFloat(v)
        case .string(let s): return Self.pythonRepr(s)
        case .list(let l): return "[" + l.map(\.repr).joined(separator: ", ") + "]"
        case .dict(let d): return "{" + d.pairs.map { Self.pythonRepr($0.0) + ": " + $0.1.repr }.joined(separator: ", ") + "}"
        case .namespace: return "<Namespace>"
        case .function(let f): return "<function \(f.name)>"
        }
    }

    static func pythonFloat(_ v: Double) -> String {
        if v.isNaN { return "nan" }
        if v.isInfinite { return v > 0 ? "inf" : "-inf" }
        if v == v.rounded(), abs(v) < 1e16 { return String(format: "%.1f", v) }
        // Swift's shortest round-trip digits match Python's repr; only the exponent spelling differs.
        var s = "\(v)"
        if let e = s.firstIndex(of: "e") {
            var exp = String(s[s.index(after: e)...])
            let sign = exp.hasPrefix("-") ? "-" : "+"
            exp = exp.trimmingCharacters(in: CharacterSet(charactersIn: "+-"))
            if exp.count < 2 { exp = "0" + exp }
            s = String(s[..<e]) + "e" + sign + exp
        }
        return s
    }

    static func pythonRepr(_ s: String) -> String {
        let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
        var out = String(quote)
        for c in s.unicodeScalars {
            switch c {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if Character(c) == quote { out += "\\" + String(c) } else if c.value < 0x20 || c.value == 0x7F {
                    out += String(format: "\\x%02x", c.value)
                } else {
                    out.unicodeScalars.append(c)
                }
            }
        }
        return out + String(quote)
    }

    /// Python's json.dumps with transformers' tojson defaults (ensure_ascii off, key order kept).
    func json(indent: Int?, level: Int = 0, sortKeys: Bool = false) throws -> String {
        let (itemSep, keySep) = indent == nil ? (", ", ": ") : (",", ": ")
        func wrap(_ items: [String], _ open: String, _ close: String) -> String {
            guard !items.isEmpty else { return open + close }
            guard let n = indent else { return open + items.joined(separator: itemSep) + close }
            let pad = "\n" + String(repeating: " ", count: n * (level + 1))
            return open + pad + items.joined(separator: itemSep + pad) + "\n" + String(repeating: " ", count: n * level) + close
        }
        switch self {
        case .none: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let v): return String(v)
        case .double(let v): return v.isNaN ? "NaN" : v.isInfinite ? (v > 0 ? "Infinity" : "-Infinity") : Self.pythonFloat(v)
        case .string(let s): return Self.jsonString(s)
        case .list(let l): return wrap(try l.map { try $0.json(indent: indent, level: level + 1, sortKeys: sortKeys) }, "[", "]")
        case .dict(let d):
            let codePoints = { (k: String) in k.unicodeScalars.map(\.value) }
            let pairs = sortKeys ? d.pairs.sorted { codePoints($0.0).lexicographicallyPrecedes(codePoints($1.0)) } : d.pairs
            return wrap(try pairs.map { key, value in
                Self.jsonString(key) + keySep + (try value.json(indent: indent, level: level + 1, sortKeys: sortKeys))
            }, "{", "}")
        case .undefined, .namespace, .function:
            throw JinjaRuntimeError("tojson cannot serialise \(typeName)")
        }
    }

    static func jsonString(_ s: String) -> String {
        var out = "\""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if c.value < 0x20 { out += String(format: "\\u%04x", c.value) } else { out.unicodeScalars.append(c) }
            }
        }
        return out + "\""
    }

    var typeName: String {
        switch self {
        case .undefined(let what): return "undefined '\(what)'"
        case .none: return "none"
        case .bool: return "a boolean"
        case .int: return "an integer"
        case .double: return "a float"
        case .string: return "a string"
        case .list: return "a list"
        case .dict: return "a mapping"
        case .namespace: return "a namespace"
        case .function: return "a function"
        }
    }

    /// Python's ==: numbers (and booleans) by value, containers element-wise.
    static func equal(_ a: JinjaValue, _ b: JinjaValue) -> Bool {
        switch (a, b) {
        case (.undefined, .undefined), (.none, .none): return true
        case (.string(let x), .string(let y)): return x.unicodeScalars.elementsEqual(y.unicodeScalars)
        case (.list(let x), .list(let y)): return x.count == y.count && zip(x, y).allSatisfy { equal($0, $1) }
        case (.dict(let x), .dict(let y)):
            return Set(x.keys) == Set(y.keys) && x.keys.allSatisfy { equal(x[$0]!, y[$0]!) }
        case (.namespace(let x), .namespace(let y)): return x === y
        default:
            if let x = a.number, let y = b.number { return x == y }
            return false
        }
    }

    /// The numeric value of a number or boolean (Python's bool is an int).
    var number: Double? {
        switch self {
        case .int(let v): return Double(v)
        case .double(let v): return v
        case .bool(let b): return b ? 1 : 0
        default: return nil
        }
    }

    var integer: Int? {
        switch self {
        case .int(let v): return v
        case .bool(let b): return b ? 1 : 0
        default: return nil
        }
    }
}

extension JinjaValue: Equatable {
    public static func == (a: JinjaValue, b: JinjaValue) -> Bool { equal(a, b) }
}

/// A failure while rendering; the renderer adds the file and position.
struct JinjaRuntimeError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// `raise_exception(...)` in a template: the template itself rejects the conversation.
struct JinjaRaised: Error {
    let message: String
}

// MARK: - Template

/// A parsed Jinja template, rendered with transformers' settings.
public struct JinjaTemplate: Sendable {
    public let source: String
    /// Where the template came from, for error messages.
    public let file: String
    let nodes: [JinjaNode]

    public init(source: String, file: String) throws {
        self.source = source
        self.file = file
        var lexer = JinjaLexer(source: source, file: file)
        var parser = JinjaParser(toks: try lexer.tokenize(), file: file)
        nodes = try parser.parseBody(until: []).0
    }

    public func render(_ context: [String: JinjaValue]) throws -> String {
        let r = JinjaRenderer(file: file, context: context)
        var out = ""
        _ = try r.render(nodes, into: &out)
        return out
    }
}

extension JinjaNode: @unchecked Sendable {}

final class JinjaRenderer {
    let file: String
    var scopes: [[String: JinjaValue]]
    /// Work done so far (nodes rendered, expressions evaluated, elements built): a template from a
    /// stranger's checkpoint must not loop for hours, nest values until freeing them overflows the stack,
    /// or build strings and lists larger than memory.
    var steps = 0
    var macroDepth = 0
    static let maxSteps = 1_000_000
    static let maxMacroDepth = 50
    static let maxValueDepth = 100
    /// Longest string (UTF-8 bytes) and list a template may build, and the rendered text's size.
    static let maxStringBytes = 16 << 20
    static let maxListCount = 1 << 20

    init(file: String, context: [String: JinjaValue]) {
        self.file = file
        var globals = Self.globals
        for (k, v) in context { globals[k] = v }
        scopes = [globals]
    }

    enum Flow { case normal, breakLoop, continueLoop }

    func fail(_ message: String, at p: JinjaPos) -> ModelError { ModelError("\(file):\(p): \(message)") }

    func lookup(_ name: String) -> JinjaValue {
        for scope in scopes.reversed() { if let v = scope[name] { return v } }
        return .undefined(name)
    }

    func assign(_ name: String, _ value: JinjaValue) { scopes[scopes.count - 1][name] = value }

    // MARK: statements

    func render(_ nodes: [JinjaNode], into out: inout String) throws -> Flow {
        for node in nodes {
            let flow = try render(node, into: &out)
            if flow != .normal { return flow }
            guard out.utf8.count <= Self.maxStringBytes else {
                throw ModelError("\(file): the template renders more than \(Self.maxStringBytes >> 20) MiB of text")
            }
        }
        return .normal
    }

    /// Counts `n` units of work against the budget.
    func spend(_ n: Int = 1) throws {
        steps += n
        guard steps <= Self.maxSteps else {
            throw ModelError(
                "\(file): the template takes more than \(Self.maxSteps) steps to render (a loop that does not end?)")
        }
    }

    /// Refuses strings, lists and nesting beyond the limits, before they are stored.
    func checkSize(_ v: JinjaValue) throws {
        switch v {
        case .string(let s) where s.utf8.count > Self.maxStringBytes:
            throw JinjaRuntimeError("a string longer than \(Self.maxStringBytes >> 20) MiB")
        case .list(let l) where l.count > Self.maxListCount:
            throw JinjaRuntimeError("a list longer than \(Self.maxListCount) items")
        default: break
        }
    }

    /// Refuses turning `v` into text when that text would pass the string limit (a list of a million
    /// references to one long string costs little until it is printed).
    func checkText(_ v: JinjaValue) throws {
        var bytes = 0
        func visit(_ v: JinjaValue) throws {
            switch v {
            case .string(let s): bytes += s.utf8.count
            case .list(let l):
                try spend(l.count)
                for item in l where bytes <= Self.maxStringBytes { bytes += 2; try visit(item) }
            case .dict(let d):
                try spend(d.keys.count)
                for (k, item) in d.pairs where bytes <= Self.maxStringBytes {
                    bytes += k.utf8.count + 6
                    try visit(item)
                }
            default: bytes += 32
            }
        }
        try visit(v)
        guard bytes <= Self.maxStringBytes else {
            throw JinjaRuntimeError("text longer than \(Self.maxStringBytes >> 20) MiB")
        }
    }

    /// `v` as text, within the string limit.
    func text(_ v: JinjaValue) throws -> String {
        try checkText(v)
        return v.str
    }

    /// Nesting depth of `v`, visiting at most `maxValueDepth` levels (each visit is budgeted).
    func checkDepth(_ v: JinjaValue, level: Int = 0) throws {
        guard level <= Self.maxValueDepth else {
            throw JinjaRuntimeError("a value nested deeper than \(Self.maxValueDepth) levels")
        }
        switch v {
        case .list(let l):
            try spend(l.count)
            for item in l { try checkDepth(item, level: level + 1) }
        case .dict(let d):
            try spend(d.keys.count)
            for (_, item) in d.pairs { try checkDepth(item, level: level + 1) }
        default: break
        }
    }

    func render(_ node: JinjaNode, into out: inout String) throws -> Flow {
        try spend()
        switch node {
        case .text(let t): out += t
        case .output(let e):
            let v = try eval(e)
            do { out += try text(v) } catch let err as JinjaRuntimeError { throw fail(err.message, at: e.pos) }
        case .ifChain(let branches, let otherwise):
            for (cond, body) in branches where try eval(cond).truthy { return try render(body, into: &out) }
            return try render(otherwise, into: &out)
        case .forLoop(let targets, let iterable, let filter, let body, let otherwise, let p):
            return try renderFor(targets, iterable, filter, body, otherwise, at: p, into: &out)
        case .set(let targets, let e, let p):
            let v = try eval(e)
            do { try checkDepth(v) } catch let err as JinjaRuntimeError { throw fail(err.message, at: p) }
            if targets.count == 1 { assign(targets[0], v) } else {
                let items = try iterate(v, at: p)
                guard items.count == targets.count else {
                    throw fail("cannot unpack \(items.count) values into \(targets.count) names", at: p)
                }
                for (t, item) in zip(targets, items) { assign(t, item) }
            }
        case .setAttr(let object, let attr, let e, let p):
            guard case .namespace(let ns) = lookup(object) else {
                throw fail("cannot assign attribute '\(attr)' on '\(object)': it is not a namespace()", at: p)
            }
            let v = try eval(e)
            do { try checkDepth(v) } catch let err as JinjaRuntimeError { throw fail(err.message, at: p) }
            ns.values[attr] = v
        case .setBlock(let name, let body):
            var captured = ""
            _ = try render(body, into: &captured)
            assign(name, .string(captured))
        case .macro(let name, let params, let body):
            assign(name, makeMacro(name, params, body))
        case .breakLoop: return .breakLoop
        case .continueLoop: return .continueLoop
        }
        return .normal
    }

    func renderFor(_ targets: [String], _ iterable: JinjaExpr, _ filter: JinjaExpr?, _ body: [JinjaNode],
                   _ otherwise: [JinjaNode], at p: JinjaPos, into out: inout String) throws -> Flow {
        var items = try iterate(try eval(iterable), at: iterable.pos)
        func bind(_ item: JinjaValue) throws {
            if targets.count == 1 { assign(targets[0], item); return }
            let parts = try iterate(item, at: p)
            guard parts.count == targets.count else {
                throw fail("cannot unpack \(parts.count) values into \(targets.count) loop variables", at: p)
            }
            for (t, v) in zip(targets, parts) { assign(t, v) }
        }
        if let filter {
            items = try items.filter { item in
                scopes.append([:])
                defer { scopes.removeLast() }
                try bind(item)
                return try eval(filter).truthy
            }
        }
        if items.isEmpty { return try render(otherwise, into: &out) }
        let n = items.count
        for (i, item) in items.enumerated() {
            // Each iteration gets a fresh scope, as in Jinja2: a `set` in the body does not outlive it.
            try spend()
            scopes.append([:])
            defer { scopes.removeLast() }
            var loop = JinjaDict([("index", .int(i + 1)), ("index0", .int(i)), ("revindex", .int(n - i)),
                                  ("revindex0", .int(n - i - 1)), ("first", .bool(i == 0)), ("last", .bool(i == n - 1)),
                                  ("length", .int(n)), ("depth", .int(1)), ("depth0", .int(0))])
            loop["previtem"] = i > 0 ? items[i - 1] : .undefined("loop.previtem")
            loop["nextitem"] = i < n - 1 ? items[i + 1] : .undefined("loop.nextitem")
            loop["cycle"] = .function(JinjaFunction(name: "loop.cycle") { args, _ in
                guard !args.isEmpty else { throw JinjaRuntimeError("loop.cycle needs at least one value") }
                return args[i % args.count]
            })
            assign("loop", .dict(loop))
            try bind(item)
            if try render(body, into: &out) == .breakLoop { break }
        }
        return .normal
    }

    func makeMacro(_ name: String, _ params: [(String, JinjaExpr?)], _ body: [JinjaNode]) -> JinjaValue {
        .function(JinjaFunction(name: name) { [unowned self] args, kwargs in
            guard args.count <= params.count else {
                throw JinjaRuntimeError("macro '\(name)' takes \(params.count) arguments, got \(args.count)")
            }
            // A macro sees the template's globals and its own arguments, not the caller's locals.
            guard macroDepth < Self.maxMacroDepth else {
                throw JinjaRuntimeError("macro '\(name)' calls nest deeper than \(Self.maxMacroDepth) levels")
            }
            macroDepth += 1
            let saved = scopes
            scopes = [scopes[0], [:]]
            defer {
                scopes = saved
                macroDepth -= 1
            }
            for (i, (param, def)) in params.enumerated() {
                if i < args.count { assign(param, args[i]) } else if let v = kwargs.first(where: { $0.0 == param })?.1 {
                    assign(param, v)
                } else {
                    assign(param, try def.map { try self.eval($0) } ?? .undefined(param))
                }
            }
            if let bad = kwargs.first(where: { kw in !params.contains { $0.0 == kw.0 } }) {
                throw JinjaRuntimeError("macro '\(name)' has no argument '\(bad.0)'")
            }
            var out = ""
            _ = try self.render(body, into: &out)
            return .string(out)
        })
    }

    func iterate(_ v: JinjaValue, at p: JinjaPos) throws -> [JinjaValue] {
        try spend()
        switch v {
        case .undefined: return []
        case .list(let l): return l
        case .dict(let d): return d.keys.map { .string($0) }
        case .string(let s): return s.unicodeScalars.map { .string(String($0)) }
        default: throw fail("cannot iterate over \(v.typeName)", at: p)
        }
    }

    // MARK: expressions

    func eval(_ e: JinjaExpr) throws -> JinjaValue {
        try spend()
        do {
            let v = try evalKind(e)
            try checkSize(v)
            if case .list(let l) = v, e.builds { try spend(l.count) }  // building a list is work per item
            return v
        } catch let err as JinjaRuntimeError {
            throw fail(err.message, at: e.pos)
        }
    }

    func evalKind(_ e: JinjaExpr) throws -> JinjaValue {
        switch e.kind {
        case .literal(let v): return v
        case .name(let n): return lookup(n)
        case .list(let items): return .list(try items.map(eval))
        case .dict(let pairs):
            var d = JinjaDict()
            for (k, v) in pairs {
                guard case .string(let key) = try eval(k) else { throw JinjaRuntimeError("dict keys must be strings") }
                d[key] = try eval(v)
            }
            return .dict(d)
        case .attr(let base, let name): return try attribute(try eval(base), name)
        case .item(let base, let index): return try item(try eval(base), try eval(index))
        case .slice(let base, let a, let b, let c):
            return try slice(try eval(base), try a.map(eval), try b.map(eval), try c.map(eval))
        case .call(let fn, let args, let kwargs):
            let f = try eval(fn)
            guard case .function(let function) = f else { throw JinjaRuntimeError("\(f.typeName) is not callable") }
            return try function.call(try args.map(eval), try kwargs.map { ($0.0, try eval($0.1)) })
        case .filter(let base, let name, let args, let kwargs):
            return try applyFilter(name, try eval(base), try args.map(eval), try kwargs.map { ($0.0, try eval($0.1)) })
        case .test(let base, let name, let args, let negated):
            return .bool(try applyTest(name, try eval(base), try args.map(eval)) != negated)
        case .not(let x): return .bool(!(try eval(x).truthy))
        case .neg(let x):
            switch try eval(x) {
            case .int(let v):
                guard v != .min else { throw JinjaRuntimeError("integer overflow in -(\(v))") }
                return .int(-v)
            case .double(let v): return .double(-v)
            case let v: throw JinjaRuntimeError("cannot negate \(v.typeName)")
            }
        case .and(let a, let b):
            let x = try eval(a)
            return x.truthy ? try eval(b) : x
        case .or(let a, let b):
            let x = try eval(a)
            return x.truthy ? x : try eval(b)
        case .binary(let op, let a, let b): return try binary(op, try eval(a), try eval(b))
        case .compare(let first, let ops):
            var left = try eval(first)
            for (op, rightExpr) in ops {
                let right = try eval(rightExpr)
                guard try compare(op, left, right) else { return .bool(false) }
                left = right
            }
            return .bool(true)
        case .conditional(let then, let cond, let otherwise):
            if try eval(cond).truthy { return try eval(then) }
            return try otherwise.map(eval) ?? .undefined("conditional without else")
        }
    }

    func undefinedUse(_ v: JinjaValue) -> JinjaRuntimeError? {
        if case .undefined(let what) = v { return JinjaRuntimeError("'\(what)' is undefined") }
        return nil
    }

    func attribute(_ base: JinjaValue, _ name: String) throws -> JinjaValue {
        if let err = undefinedUse(base) { throw err }
        switch base {
        case .dict(let d):
            if let m = dictMethod(d, name) { return m }
            return d[name] ?? .undefined(name)
        case .namespace(let ns): return ns.values[name] ?? .undefined(name)
        case .string(let s): return stringMethod(s, name) ?? .undefined(name)
        default: return .undefined(name)
        }
    }

    func item(_ base: JinjaValue, _ index: JinjaValue) throws -> JinjaValue {
        if let err = undefinedUse(base) { throw err }
        switch (base, index) {
        case (.dict(let d), .string(let k)): return d[k] ?? dictMethod(d, k) ?? .undefined(k)
        case (.namespace(let ns), .string(let k)): return ns.values[k] ?? .undefined(k)
        case (.list(let l), _):
            guard let i = index.integer else { return .undefined("[\(index.repr)]") }
            let j = i < 0 ? l.count + i : i
            return l.indices.contains(j) ? l[j] : .undefined("[\(i)]")
        case (.string(let s), _):
            guard let i = index.integer else { return stringMethod(s, index.str) ?? .undefined("[\(index.repr)]") }
            let chars = Array(s.unicodeScalars)
            let j = i < 0 ? chars.count + i : i
            return chars.indices.contains(j) ? .string(String(chars[j])) : .undefined("[\(i)]")
        default: return .undefined("[\(index.repr)]")
        }
    }

    func slice(_ base: JinjaValue, _ a: JinjaValue?, _ b: JinjaValue?, _ c: JinjaValue?) throws -> JinjaValue {
        func bound(_ v: JinjaValue?) throws -> Int? {
            guard let v, !(v == .none) else { return nil }
            guard let i = v.integer else { throw JinjaRuntimeError("slice indices must be integers") }
            return i
        }
        let step = try bound(c) ?? 1
        guard step != 0 else { throw JinjaRuntimeError("slice step cannot be zero") }
        func indices(_ n: Int) throws -> [Int] {
            // Python's slice.indices.
            func clamp(_ v: Int?, _ def: Int) -> Int {
                guard var v else { return def }
                if v < 0 { v += n }
                return step > 0 ? min(max(v, 0), n) : min(max(v, -1), n - 1)
            }
            let start = clamp(try bound(a), step > 0 ? 0 : n - 1), stop = clamp(try bound(b), step > 0 ? n : -1)
            return try Self.arithmetic(from: start, to: stop, by: step)
        }
        switch base {
        case .list(let l): return .list(try indices(l.count).map { l[$0] })
        case .string(let s):
            let chars = Array(s.unicodeScalars)
            var out = String.UnicodeScalarView()
            out.append(contentsOf: try indices(chars.count).map { chars[$0] })
            return .string(String(out))
        default:
            if let err = undefinedUse(base) { throw err }
            throw JinjaRuntimeError("cannot slice \(base.typeName)")
        }
    }

    func binary(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> JinjaValue {
        if op == "~" {
            try checkText(.list([a, b]))
            return .string(a.str + b.str)
        }
        if let err = undefinedUse(a) ?? undefinedUse(b) { throw err }
        switch (op, a, b) {
        case ("+", .string(let x), .string(let y)): return .string(x + y)
        case ("+", .list(let x), .list(let y)): return .list(x + y)
        case ("*", .string(let x), _) where b.integer != nil:
            let n = try repetitions(b.integer!, of: x.utf8.count, limit: Self.maxStringBytes)
            return .string(String(repeating: x, count: n))
        case ("*", .list(let x), _) where b.integer != nil:
            let n = try repetitions(b.integer!, of: x.count, limit: Self.maxListCount)
            return .list(Array(repeatElement(x, count: n).joined()))
        default: break
        }
        guard let x = a.number, let y = b.number else {
            throw JinjaRuntimeError("unsupported operand types for \(op): \(a.typeName) and \(b.typeName)")
        }
        if let i = a.integer, let j = b.integer, let r = try integerOp(op, i, j) { return .int(r) }
        switch op {
        case "+": return .double(x + y)
        case "-": return .double(x - y)
        case "*": return .double(x * y)
        case "/":
            guard y != 0 else { throw JinjaRuntimeError("division by zero") }
            return .double(x / y)
        case "//":
            guard y != 0 else { throw JinjaRuntimeError("division by zero") }
            return .double((x / y).rounded(.down))
        case "%":
            guard y != 0 else { throw JinjaRuntimeError("modulo by zero") }
            return .double(x - (x / y).rounded(.down) * y)
        case "**": return .double(pow(x, y))
        default: throw JinjaRuntimeError("unsupported operator \(op)")
        }
    }

    /// Python's range(start, stop, step) (step ≠ 0), refused beyond the list limit; no step overflows.
    static func arithmetic(from start: Int, to stop: Int, by step: Int) throws -> [Int] {
        let count = ((Double(stop) - Double(start)) / Double(step)).rounded(.up)
        guard count <= Double(maxListCount) else { throw JinjaRuntimeError("range of \(count) items is too long") }
        var out: [Int] = [], v = start
        while step > 0 ? v < stop : v > stop {
            out.append(v)
            let (next, overflow) = v.addingReportingOverflow(step)
            if overflow { break }
            v = next
        }
        return out
    }

    /// How often a value of `size` may repeat: `count` (negatives as 0) if the result stays within `limit`.
    func repetitions(_ count: Int, of size: Int, limit: Int) throws -> Int {
        let n = max(0, count)
        let (total, overflow) = n.multipliedReportingOverflow(by: size)
        guard !overflow, total <= limit else { throw JinjaRuntimeError("repeating \(n) times exceeds the size limit") }
        return n
    }

    /// Integer arithmetic as Python's, with an error where a 64-bit result overflows (Python's integers
    /// do not); nil for operators that go to floating point.
    func integerOp(_ op: String, _ i: Int, _ j: Int) throws -> Int? {
        let result: (partialValue: Int, overflow: Bool)
        switch op {
        case "+": result = i.addingReportingOverflow(j)
        case "-": result = i.subtractingReportingOverflow(j)
        case "*": result = i.multipliedReportingOverflow(by: j)
        case "//", "%":
            guard j != 0 else { throw JinjaRuntimeError("integer division or modulo by zero") }
            let q = i.dividedReportingOverflow(by: j), r = i.remainderReportingOverflow(dividingBy: j)
            guard !q.overflow, !r.overflow else { throw JinjaRuntimeError("integer overflow in \(i) \(op) \(j)") }
            let floors = r.partialValue != 0 && (r.partialValue < 0) != (j < 0)  // Python rounds toward -inf
            return op == "//" ? q.partialValue - (floors ? 1 : 0) : r.partialValue + (floors ? j : 0)
        case "**" where j >= 0:
            let p = pow(Double(i), Double(j))
            guard abs(p) < 9.2e18 else { throw JinjaRuntimeError("integer overflow in \(i) ** \(j)") }
            return Int(p)
        default: return nil
        }
        guard !result.overflow else { throw JinjaRuntimeError("integer overflow in \(i) \(op) \(j)") }
        return result.partialValue
    }

    func compare(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> Bool {
        switch op {
        case "==": return a == b
        case "!=": return !(a == b)
        case "in": return try contains(b, a)
        case "not in": return try !contains(b, a)
        default: break
        }
        let order: Bool
        switch (a, b) {
        case (.string(let x), .string(let y)):
            let (u, v) = (Array(x.unicodeScalars.map(\.value)), Array(y.unicodeScalars.map(\.value)))
            order = op.hasPrefix("<") ? u.lexicographicallyPrecedes(v) : v.lexicographicallyPrecedes(u)
            return order || (op.hasSuffix("=") && u == v)
        default:
            guard let x = a.number, let y = b.number else {
                throw JinjaRuntimeError("cannot compare \(a.typeName) and \(b.typeName) with \(op)")
            }
            switch op {
            case "<": return x < y
            case "<=": return x <= y
            case ">": return x > y
            default: return x >= y
            }
        }
    }

    func contains(_ container: JinjaValue, _ v: JinjaValue) throws -> Bool {
        switch container {
        case .string(let s):
            guard case .string(let sub) = v else { throw JinjaRuntimeError("'in <string>' needs a string, not \(v.typeName)") }
            return sub.isEmpty || s.range(of: sub, options: .literal) != nil
        case .list(let l): return l.contains { $0 == v }
        case .dict(let d):
            guard case .string(let k) = v else { return false }
            return d[k] != nil
        case .namespace(let ns):
            guard case .string(let k) = v else { return false }
            return ns.values[k] != nil
        case .undefined: return false
        default:
            throw JinjaRuntimeError("'in' needs a string, list or mapping, not \(container.typeName)")
        }
    }
}

// MARK: - Filters, tests, methods and globals

extension JinjaRenderer {
    static let globals: [String: JinjaValue] = [
        "raise_exception": .function(JinjaFunction(name: "raise_exception") { args, _ in
            throw JinjaRaised(message: args.first?.str ?? "")
        }),
        "strftime_now": .function(JinjaFunction(name: "strftime_now") { args, _ in
            guard case .string(let format)? = args.first else { throw JinjaRuntimeError("strftime_now needs a format string") }
            return .string(try strftime(format, Date()))
        }),
        "namespace": .function(JinjaFunction(name: "namespace") { args, kwargs in
            var d = JinjaDict()
            if case .dict(let initial)? = args.first { d = initial }
            for (k, v) in kwargs { d[k] = v }
            return .namespace(JinjaNamespace(d))
        }),
        "dict": .function(JinjaFunction(name: "dict") { _, kwargs in .dict(JinjaDict(kwargs)) }),
        "range": .function(JinjaFunction(name: "range") { args, _ in
            let n = args.compactMap(\.integer)
            guard n.count == args.count, (1...3).contains(n.count) else { throw JinjaRuntimeError("range takes 1 to 3 integers") }
            let (start, stop, step) = n.count == 1 ? (0, n[0], 1) : (n[0], n[1], n.count == 3 ? n[2] : 1)
            guard step != 0 else { throw JinjaRuntimeError("range step cannot be zero") }
            return .list(try JinjaRenderer.arithmetic(from: start, to: stop, by: step).map { .int($0) })
        }),
    ]

    /// The C strftime conversions chat templates use (dates for Llama 3's system turn).
    static func strftime(_ format: String, _ date: Date) throws -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone.current
        let map: [Character: String] = ["d": "dd", "m": "MM", "Y": "yyyy", "y": "yy", "b": "MMM", "B": "MMMM",
                                        "a": "EEE", "A": "EEEE", "H": "HH", "M": "mm", "S": "ss", "I": "hh", "p": "a", "j": "DDD"]
        var out = "", chars = Array(format), i = 0
        while i < chars.count {
            if chars[i] == "%", i + 1 < chars.count {
                let c = chars[i + 1]
                if c == "%" { out += "%" } else if let pattern = map[c] {
                    f.dateFormat = pattern
                    out += f.string(from: date)
                } else {
                    throw JinjaRuntimeError("strftime_now: unsupported conversion %\(c)")
                }
                i += 2
            } else {
                out.append(chars[i])
                i += 1
            }
        }
        return out
    }

    func argument(_ name: String, _ index: Int, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) -> JinjaValue? {
        kwargs.first { $0.0 == name }?.1 ?? (args.indices.contains(index) ? args[index] : nil)
    }

    func applyFilter(_ name: String, _ v: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue {
        func arg(_ n: String, _ i: Int) -> JinjaValue? { argument(n, i, args, kwargs) }
        func string() -> String { v.str }  // an undefined value is "" here, as in Jinja2
        try checkText(v)
        try spend()
        switch name {
        case "default", "d":
            let fallback = arg("default_value", 0) ?? .string("")
            let boolean = arg("boolean", 1)?.truthy ?? false
            return v.isUndefined || (boolean && !v.truthy) ? fallback : v
        case "safe": return v
        case "string": return .string(v.str)
        case "trim":
            var chars: String?
            if case .string(let set)? = arg("chars", 0) { chars = set }
            return .string(strip(string(), chars, left: true, right: true))
        case "upper": return .string(string().uppercased())
        case "lower": return .string(string().lowercased())
        case "capitalize": return .string(capitalize(string()))
        case "title": return .string(title(string()))
        case "replace":
            guard case .string(let old)? = arg("old", 0), case .string(let new)? = arg("new", 1) else {
                throw JinjaRuntimeError("replace needs two strings")
            }
            return .string(try replace(string(), old, new, count: arg("count", 2)?.integer))
        case "tojson":
            if let n = arg("indent", 0)?.integer, !(0...64).contains(n) {
                throw JinjaRuntimeError("tojson indent \(n) is out of range")
            }
            try checkText(v)
            return .string(try v.json(indent: arg("indent", 0)?.integer, sortKeys: arg("sort_keys", 3)?.truthy ?? false))
        case "length", "count":
            switch v {
            case .string(let s): return .int(s.unicodeScalars.count)
            case .list(let l): return .int(l.count)
            case .dict(let d): return .int(d.keys.count)
            case .undefined: return .int(0)
            default: throw JinjaRuntimeError("\(v.typeName) has no length")
            }
        case "wordcount": return .int(string().split(whereSeparator: { $0.isWhitespace }).count)
        case "int":
            switch v {
            case .int, .bool: return .int(v.integer!)
            case .double(let d):
                guard let i = Int(exactly: d.rounded(.towardZero)) else {
                    throw JinjaRuntimeError("cannot convert \(d) to an integer")
                }
                return .int(i)
            case .string(let s): return .int(Int(s.trimmingCharacters(in: .whitespaces)) ?? (arg("default", 0)?.integer ?? 0))
            default: return arg("default", 0) ?? .int(0)
            }
        case "float":
            if let n = v.number { return .double(n) }
            if case .string(let s) = v, let d = Double(s.trimmingCharacters(in: .whitespaces)) { return .double(d) }
            return arg("default", 0) ?? .double(0)
        case "abs":
            switch v {
            case .int(let i):
                guard i != .min else { throw JinjaRuntimeError("integer overflow in abs(\(i))") }
                return .int(abs(i))
            case .double(let d): return .double(abs(d))
            default: throw JinjaRuntimeError("abs needs a number, not \(v.typeName)")
            }
        case "round":
            guard let x = v.number else { throw JinjaRuntimeError("round needs a number") }
            let p = pow(10, Double(arg("precision", 0)?.integer ?? 0))
            return .double((x * p).rounded(.toNearestOrEven) / p)
        case "items":
            guard case .dict(let d) = v else {
                if v.isUndefined { return .list([]) }
                throw JinjaRuntimeError("items needs a mapping, not \(v.typeName)")
            }
            return .list(d.pairs.map { .list([.string($0.0), $0.1]) })
        case "dictsort":
            guard case .dict(let d) = v else { throw JinjaRuntimeError("dictsort needs a mapping, not \(v.typeName)") }
            let caseSensitive = arg("case_sensitive", 0)?.truthy ?? false
            let byValue = arg("by", 1)?.str == "value", reverse = arg("reverse", 2)?.truthy ?? false
            func key(_ p: (String, JinjaValue)) -> JinjaValue {
                let k = byValue ? p.1 : .string(p.0)
                if !caseSensitive, case .string(let s) = k { return .string(s.lowercased()) }
                return k
            }
            var failure: Error?
            let sorted = d.pairs.sorted { a, b in
                do { return try compare(reverse ? ">" : "<", key(a), key(b)) } catch {
                    failure = error
                    return false
                }
            }
            if let failure { throw failure }
            return .list(sorted.map { .list([.string($0.0), $0.1]) })
        case "escape", "e":
            var out = ""
            for c in string().unicodeScalars {
                switch c {
                case "&": out += "&amp;"
                case "<": out += "&lt;"
                case ">": out += "&gt;"
                case "\"": out += "&#34;"
                case "'": out += "&#39;"
                default: out.unicodeScalars.append(c)
                }
            }
            return .string(out)
        case "indent":
            let width = arg("width", 0)?.integer ?? 4
            let first = arg("first", 1)?.truthy ?? false, blank = arg("blank", 2)?.truthy ?? false
            let lines = string().components(separatedBy: "\n")
            guard (0...1000).contains(width), lines.count * width <= Self.maxStringBytes else {
                throw JinjaRuntimeError("indent width \(width) is out of range for this text")
            }
            let pad = String(repeating: " ", count: width)
            return .string(lines.enumerated().map { i, l in
                (i == 0 && !first) || (l.isEmpty && !blank) ? l : pad + l
            }.joined(separator: "\n"))
        default: break
        }
        let items = try iterate(v, at: JinjaPos(line: 0, column: 0))
        switch name {
        case "list": return .list(items)
        case "first": return items.first ?? .undefined("first of an empty sequence")
        case "last": return items.last ?? .undefined("last of an empty sequence")
        case "reverse":
            if case .string(let s) = v {
                var out = String.UnicodeScalarView()
                out.append(contentsOf: s.unicodeScalars.reversed())
                return .string(String(out))
            }
            return .list(items.reversed())
        case "join":
            let sep = arg("d", 0)?.str ?? ""
            let picked = try arg("attribute", 1).map { a in try items.map { try attribute($0, a.str) } } ?? items
            return .string(picked.map(\.str).joined(separator: sep))
        case "map":
            if let a = arg("attribute", -1) {
                let def = arg("default", -1)
                return .list(try items.map { item in
                    let r = try attribute(item, a.str)
                    return r.isUndefined ? (def ?? r) : r
                })
            }
            guard case .string(let filter)? = args.first, JinjaParser.filters.contains(filter) else {
                throw JinjaRuntimeError("map needs attribute= or a supported filter name")
            }
            return .list(try items.map { try applyFilter(filter, $0, Array(args.dropFirst()), []) })
        case "select", "reject":
            guard case .string(let test)? = args.first else { return .list(items.filter { $0.truthy == (name == "select") }) }
            guard JinjaParser.tests.contains(test) else { throw JinjaRuntimeError("unsupported test '\(test)'") }
            return .list(try items.filter { try applyTest(test, $0, Array(args.dropFirst())) == (name == "select") })
        case "selectattr", "rejectattr":
            guard case .string(let attr)? = args.first else { throw JinjaRuntimeError("\(name) needs an attribute name") }
            let keep = name == "selectattr"
            return .list(try items.filter { item in
                let a = try attribute(item, attr)
                guard args.count > 1, case .string(let test) = args[1] else { return a.truthy == keep }
                guard JinjaParser.tests.contains(test) else { throw JinjaRuntimeError("unsupported test '\(test)'") }
                return try applyTest(test, a, Array(args.dropFirst(2))) == keep
            })
        case "unique":
            var seen: [JinjaValue] = []
            for item in items where !seen.contains(item) { seen.append(item) }
            return .list(seen)
        case "sort":
            let reverse = arg("reverse", 0)?.truthy ?? false
            let key = arg("attribute", 2)?.str
            var failure: Error?
            let keys = try items.map { item in try key.map { k in try attribute(item, k) } ?? item }
            let sorted = keys.enumerated().sorted { x, y in
                do { return try compare(reverse ? ">" : "<", x.element, y.element) } catch {
                    failure = error
                    return false
                }
            }.map { items[$0.offset] }
            if let failure { throw failure }
            return .list(sorted)
        case "min", "max":
            guard var best = items.first else { return .undefined("\(name) of an empty sequence") }
            for item in items.dropFirst() where try compare(name == "min" ? "<" : ">", item, best) { best = item }
            return best
        case "sum":
            return try items.reduce(JinjaValue.int(0)) { try binary("+", $0, $1) }
        default:
            throw JinjaRuntimeError("unsupported filter '\(name)'")
        }
    }

    func applyTest(_ name: String, _ v: JinjaValue, _ args: [JinjaValue]) throws -> Bool {
        func other() throws -> JinjaValue {
            guard let a = args.first else { throw JinjaRuntimeError("test '\(name)' needs an argument") }
            return a
        }
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": if case .none = v { return true } else { return false }
        case "string": if case .string = v { return true } else { return false }
        case "mapping": if case .dict = v { return true } else { return false }
        case "boolean": if case .bool = v { return true } else { return false }
        case "true": if case .bool(true) = v { return true } else { return false }
        case "false": if case .bool(false) = v { return true } else { return false }
        case "integer": if case .int = v { return true } else { return false }
        case "float": if case .double = v { return true } else { return false }
        case "number": return v.number != nil
        case "callable": if case .function = v { return true } else { return false }
        case "iterable":
            switch v {
            case .list, .dict, .string: return true
            default: return false
            }
        case "sequence":
            switch v {
            case .list, .dict, .string: return true
            default: return false
            }
        case "eq", "equalto", "==": return v == (try other())
        case "ne", "!=": return !(v == (try other()))
        case "lt", "<": return try compare("<", v, try other())
        case "gt", ">": return try compare(">", v, try other())
        case "le", "<=": return try compare("<=", v, try other())
        case "ge", ">=": return try compare(">=", v, try other())
        case "in": return try contains(try other(), v)
        case "sameas":
            switch (v, try other()) {
            case (.none, .none): return true
            case (.bool(let a), .bool(let b)): return a == b
            case (.namespace(let a), .namespace(let b)): return a === b
            default: return false
            }
        case "odd", "even", "divisibleby":
            guard let i = v.integer else { throw JinjaRuntimeError("test '\(name)' needs an integer, not \(v.typeName)") }
            if name == "divisibleby" {
                guard let d = try other().integer, d != 0 else { throw JinjaRuntimeError("divisibleby needs a non-zero integer") }
                return i.remainderReportingOverflow(dividingBy: d).partialValue == 0
            }
            return (i & 1 == 1) == (name == "odd")
        case "lower": return v.str == v.str.lowercased()
        case "upper": return v.str == v.str.uppercased()
        default: throw JinjaRuntimeError("unsupported test '\(name)'")
        }
    }

    func dictMethod(_ d: JinjaDict, _ name: String) -> JinjaValue? {
        let f: (([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue)?
        switch name {
        case "items": f = { _, _ in .list(d.pairs.map { .list([.string($0.0), $0.1]) }) }
        case "keys": f = { _, _ in .list(d.keys.map { .string($0) }) }
        case "values": f = { _, _ in .list(d.pairs.map(\.1)) }
        case "get":
            f = { args, _ in
                guard case .string(let k)? = args.first else { return args.count > 1 ? args[1] : .none }
                return d[k] ?? (args.count > 1 ? args[1] : .none)
            }
        default: f = nil
        }
        return f.map { .function(JinjaFunction(name: name, call: $0)) }
    }

    func stringMethod(_ s: String, _ name: String) -> JinjaValue? {
        func str(_ args: [JinjaValue], _ i: Int) throws -> String? {
            guard i < args.count else { return nil }
            if case .none = args[i] { return nil }
            guard case .string(let v) = args[i] else { throw JinjaRuntimeError("\(name) needs a string argument") }
            return v
        }
        let f: (([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue)?
        switch name {
        case "startswith", "endswith":
            f = { args, _ in
                let options: [JinjaValue]
                if case .list(let l)? = args.first { options = l } else { options = Array(args.prefix(1)) }
                return .bool(try options.contains { o in
                    guard case .string(let p) = o else { throw JinjaRuntimeError("\(name) needs a string") }
                    return name == "startswith" ? s.unicodeScalars.starts(with: p.unicodeScalars)
                        : s.unicodeScalars.reversed().starts(with: p.unicodeScalars.reversed())
                })
            }
        case "strip", "lstrip", "rstrip":
            f = { [unowned self] args, _ in
                .string(strip(s, try str(args, 0), left: name != "rstrip", right: name != "lstrip"))
            }
        case "upper": f = { _, _ in .string(s.uppercased()) }
        case "lower": f = { _, _ in .string(s.lowercased()) }
        case "title": f = { [unowned self] _, _ in .string(title(s)) }
        case "capitalize": f = { [unowned self] _, _ in .string(capitalize(s)) }
        case "replace":
            f = { [unowned self] args, _ in
                guard let old = try str(args, 0), let new = try str(args, 1) else {
                    throw JinjaRuntimeError("replace needs two strings")
                }
                return .string(try replace(s, old, new, count: args.count > 2 ? args[2].integer : nil))
            }
        case "split", "rsplit":
            f = { [unowned self] args, kwargs in
                let sepArg = kwargs.first { $0.0 == "sep" }.map { [$0.1] } ?? []
                let sep = try str(args, 0) ?? str(sepArg, 0)
                let maxsplit = (args.count > 1 ? args[1] : kwargs.first { $0.0 == "maxsplit" }?.1)?.integer ?? -1
                return .list(try split(s, sep, maxsplit: maxsplit, fromRight: name == "rsplit").map { .string($0) })
            }
        case "find":
            f = { args, _ in
                guard let sub = try str(args, 0) else { throw JinjaRuntimeError("find needs a string") }
                guard let r = s.range(of: sub, options: .literal) else { return .int(-1) }
                return .int(s.distance(from: s.startIndex, to: r.lowerBound))
            }
        case "count":
            f = { args, _ in
                guard let sub = try str(args, 0), !sub.isEmpty else { throw JinjaRuntimeError("count needs a non-empty string") }
                return .int(s.components(separatedBy: sub).count - 1)
            }
        case "join":
            f = { args, _ in
                guard case .list(let l)? = args.first else { throw JinjaRuntimeError("join needs a list") }
                return .string(l.map(\.str).joined(separator: s))
            }
        default: f = nil
        }
        return f.map { .function(JinjaFunction(name: name, call: $0)) }
    }

    /// Python's str.strip: whitespace, or any of `chars`.
    func strip(_ s: String, _ chars: String?, left: Bool, right: Bool) -> String {
        let set = chars.map { Set($0.unicodeScalars) }
        let drop = { (c: Unicode.Scalar) in set?.contains(c) ?? c.properties.isWhitespace }
        var u = Array(s.unicodeScalars)[...]
        if left { while let c = u.first, drop(c) { u = u.dropFirst() } }
        if right { while let c = u.last, drop(c) { u = u.dropLast() } }
        var out = String.UnicodeScalarView()
        out.append(contentsOf: u)
        return String(out)
    }

    func capitalize(_ s: String) -> String {
        guard let first = s.first else { return s }
        return first.uppercased() + s.dropFirst().lowercased()
    }

    /// Jinja's title: each word (a run after a non-letter) starts upper case, the rest lower.
    func title(_ s: String) -> String {
        var out = "", previousIsLetter = false
        for c in s {
            out += previousIsLetter ? c.lowercased() : c.uppercased()
            previousIsLetter = c.isLetter
        }
        return out
    }

    func replace(_ s: String, _ old: String, _ new: String, count: Int?) throws -> String {
        // Each match grows the text by the difference; refuse before building more than the limit.
        let growth = new.utf8.count - old.utf8.count
        if growth > 0, !old.isEmpty {
            let matches = min(s.components(separatedBy: old).count - 1, count.map { $0 < 0 ? Int.max : $0 } ?? Int.max)
            guard s.utf8.count + matches * growth <= Self.maxStringBytes else {
                throw JinjaRuntimeError("replace would build a string longer than \(Self.maxStringBytes >> 20) MiB")
            }
        }
        guard let count, count >= 0 else { return s.replacingOccurrences(of: old, with: new, options: .literal) }
        var out = s, from = out.startIndex, done = 0
        while done < count, let r = out.range(of: old, options: .literal, range: from..<out.endIndex), !old.isEmpty {
            out.replaceSubrange(r, with: new)
            from = out.index(r.lowerBound, offsetBy: new.count)
            done += 1
        }
        return out
    }

    /// Python's str.split / rsplit (sep nil: runs of whitespace, empty parts dropped).
    func split(_ s: String, _ sep: String?, maxsplit: Int, fromRight: Bool) throws -> [String] {
        guard let sep else {
            let words = s.split(whereSeparator: { $0.isWhitespace }).map(String.init)
            guard maxsplit >= 0, words.count > maxsplit + 1 else { return words }
            if fromRight { throw JinjaRuntimeError("rsplit with maxsplit and no separator is not supported") }
            // Python keeps the remainder's inner whitespace; find where the (maxsplit+1)-th word starts.
            var rest = Substring(s)
            for _ in 0..<maxsplit {
                rest = rest.drop(while: { $0.isWhitespace }).drop(while: { !$0.isWhitespace })
            }
            return Array(words.prefix(maxsplit)) + [String(rest.drop(while: { $0.isWhitespace }))]
        }
        guard !sep.isEmpty else { throw JinjaRuntimeError("empty separator") }
        let parts = s.components(separatedBy: sep)
        guard maxsplit >= 0, parts.count > maxsplit + 1 else { return parts }
        if fromRight {
            let keep = parts.count - maxsplit
            return [parts[..<keep].joined(separator: sep)] + parts[keep...]
        }
        return Array(parts[..<maxsplit]) + [parts[maxsplit...].joined(separator: sep)]
    }
}
