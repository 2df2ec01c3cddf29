import Foundation
import XCTest

@testable import Models

/// Rendering parity with transformers' apply_chat_template (fixtures from
/// scripts/reference/chat_template_fixtures.py), engine unit cases worked by hand, template discovery.
final class ChatTemplateTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/chat_templates")
    /// The script's --out folder for other templates (e.g. published ones that are not committed here).
    static let parityDir = ProcessInfo.processInfo.environment["TTRV_CHAT_TEMPLATE_FIXTURES"].map { URL(fileURLWithPath: $0) }

    struct Expected: Decodable {
        struct Message: Decodable {
            struct Part: Decodable {
                let type: String
                let text: String?
            }
            enum Content: Decodable {
                case text(String)
                case parts([Part])
                init(from decoder: Decoder) throws {
                    let c = try decoder.singleValueContainer()
                    if let s = try? c.decode(String.self) { self = .text(s) } else { self = .parts(try c.decode([Part].self)) }
                }
            }
            let role: String
            let content: Content

            var chat: ChatMessage {
                switch content {
                case .text(let s): return ChatMessage(role: role, content: .text(s))
                case .parts(let parts):
                    return ChatMessage(role: role, content: .parts(parts.map { $0.type == "image" ? .image : .text($0.text ?? "") }))
                }
            }
        }
        struct Case: Decodable {
            let template: String
            let conversation: String
            let add_generation_prompt: Bool
            let text: String?
            let error: String?
        }
        let special_tokens: [String: String]
        let conversations: [String: [Message]]
        let cases: [Case]
    }

    func testRendersLikeTransformers() throws {
        let dir = Self.parityDir ?? Self.fixtures
        let expected = try JSONDecoder().decode(Expected.self, from: Data(contentsOf: dir.appendingPathComponent("expected.json")))
        let tokens = expected.special_tokens.mapValues { JinjaValue.string($0) }
        var templates: [String: ChatTemplate] = [:]
        if Self.parityDir == nil { XCTAssertGreaterThan(expected.cases.count, 200) }
        for c in expected.cases {
            if templates[c.template] == nil {
                templates[c.template] = try ChatTemplate.load(dir.appendingPathComponent(c.template), specialTokens: tokens)
            }
            let messages = expected.conversations[c.conversation]!.map(\.chat)
            let label = "\(c.template) × \(c.conversation), add_generation_prompt \(c.add_generation_prompt)"
            do {
                let text = try templates[c.template]!.render(messages, addGenerationPrompt: c.add_generation_prompt)
                XCTAssertEqual(text, c.text, label)
                XCTAssertNil(c.error, "\(label): transformers failed with \(c.error ?? "")")
            } catch {
                XCTAssertNotNil(c.error, "\(label): \(error)")
                if let e = c.error, e.hasPrefix("TemplateError: ") {
                    XCTAssertTrue("\(error)".contains(e.dropFirst("TemplateError: ".count)), "\(label): \(error)")
                }
            }
        }
    }

    /// The real SmolLM2 and Qwen2-VL templates of the tokenizer fixtures, as HF rendered them.
    func testPublicTemplatesOfTokenizerFixtures() throws {
        for (name, cases) in TokenizerTests.cases {
            let dir = TokenizerTests.fixtures.appendingPathComponent(name)
            let template = try XCTUnwrap(try ChatTemplate.find(in: dir), name)
            XCTAssertFalse(template.isBuiltin)
            for c in cases.chat {
                XCTAssertEqual(try template.render(c.chatMessages, addGenerationPrompt: c.add_generation_prompt), c.text, name)
            }
        }
    }

    // MARK: - engine

    func render(_ source: String, _ context: [String: JinjaValue] = [:]) throws -> String {
        try JinjaTemplate(source: source, file: "t.jinja").render(context)
    }

    /// A template from a stranger's checkpoint runs no code, but it could loop, nest or grow without
    /// bound: each such template is refused with an error naming the file and the limit.
    func testHostileTemplatesHitBudgetsNotTheStack() throws {
        let hostile: [(String, String)] = [
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
            ("{% for i in range(9223372036854775807) %}{% endfor %}", "too long"),
            ("{{ 'x' * 9223372036854775807 }}", "size limit"),
            ("{{ [1] * 4611686018427387904 }}", "size limit"),
            ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "MiB"),
            ("{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}", "MiB"),
            ("{% set s = 'x' * 1000000 %}{{ s | replace('x', s) }}", "MiB"),
            ("{{ 'a\nb' | indent(1000000000) }}", "out of range"),
            ("{{ {'a': 1} | tojson(indent=-5) }}", "out of range"),
            ("{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = [ns.l] %}{% endfor %}", "nested deeper"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nest deeper"),
            ("{{ " + String(repeating: "(", count: 100_000) + "1" + String(repeating: ")", count: 100_000) + " }}", "levels"),
            ("{{ " + Array(repeating: "a", count: 50_000).joined(separator: " ~ ") + " }}", "levels"),
            ("{{ x" + String(repeating: ".y", count: 50_000) + " }}", "levels"),
            ("{{ " + String(repeating: "- ", count: 100_000) + "1 }}", "levels"),
            ("{{ " + String(repeating: "not ", count: 100_000) + "1 }}", "levels"),
            (String(repeating: "{% if true %}", count: 50_000), "levels"),
            ("{{ 9223372036854775807 + 1 }}", "overflow"),
            ("{{ -9223372036854775807 - 2 }}", "overflow"),
            ("{{ 3037000500 * 3037000500 }}", "overflow"),
            ("{{ (-9223372036854775807 - 1) // -1 }}", "overflow"),
            ("{{ 10 ** 40 }}", "overflow"),
            ("{{ 1e300 * 1e300 | int }}", "cannot convert"),
            ("{{ [1, 2, 3][::9223372036854775807] }}{{ range(0, 9223372036854775807, 4611686018427387904) }}", ""),
        ]
        for (source, expected) in hostile {
            let label = String(source.prefix(60))
            do {
                let out = try render(source)
                XCTAssertEqual(expected, "", "\(label) rendered \(out.utf8.count) bytes")
            } catch {
                XCTAssertTrue("\(error)".contains("t.jinja"), "\(label): \(error)")
                XCTAssertTrue("\(error)".contains(expected), "\(label): \(error)")
            }
        }
        // Python's floor division and modulo for negative operands, now done in integers.
        XCTAssertEqual(try render("{{ -7 // 2 }} {{ -7 % 2 }} {{ 7 // -2 }} {{ 7 % -2 }} {{ 9223372036854775807 // 1 }}"),
                       "-4 1 -4 -1 9223372036854775807")
    }

    func testWhitespaceControl() throws {
        // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before one.
        XCTAssertEqual(try render("A\n  {% if true %}\n    B\n  {% endif %}\nC"), "A\n    B\nC")
        XCTAssertEqual(try render("A  {{- ' x ' -}}  \n B {%- if true -%}  C  {%- endif %} D"), "A x BC D")
        XCTAssertEqual(try render("A\n  {%+ if true %}B{% endif %}\n"), "A\n  B")  // `+` keeps the indentation
        XCTAssertEqual(try render("A\n  {# note #}\nB {#- x -#} C"), "A\nBC")
        XCTAssertEqual(try render("A\n  {{ 'v' }}\nB"), "A\n  v\nB")  // expressions are not lstripped
        XCTAssertEqual(try render("X\n"), "X")  // one trailing newline is dropped
        XCTAssertEqual(try render("X\r\nY\n\n"), "X\nY\n")
    }

    func testLoopsScopesAndNamespace() throws {
        XCTAssertEqual(try render("{% for x in ['a','b','c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ x }}"
                                  + "{{ '!' if loop.first }}{{ '.' if loop.last }}{{ loop.length }}{% if not loop.last %},{% endif %}{% endfor %}"),
                       "103a!3,212b3,321c.3")
        // A `set` inside a loop lives for one iteration; a namespace carries state across them.
        XCTAssertEqual(try render("{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = x + 10 %}{{ x }};{% endfor %}{{ x }}"), "111;111;1")
        XCTAssertEqual(try render("{% set ns = namespace(n=0, s='') %}{% for i in range(4) %}{% set ns.n = ns.n + i %}"
                                  + "{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.n }} {{ ns.s }}"), "6 0123")
        XCTAssertEqual(try render("{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}"), "02")
        XCTAssertEqual(try render("{% for x in [] %}x{% else %}empty{% endfor %}{% for x in [1,2,3,4] if x is even %}{{ x }}{{ loop.length }}{% endfor %}"),
                       "empty2242")
        XCTAssertEqual(try render("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Ann') }} {{ greet('Bo', punct='?') }}"),
                       "Hi Ann! Hi Bo?")
        XCTAssertEqual(try render("{% set t %}in{{ 1 + 1 }}{% endset %}[{{ t }}]"), "[in2]")
        // A macro may call one defined after it, and sees top-level variables.
        XCTAssertEqual(try render("{% set top = 'T' %}{% macro a(x) %}[{{ b(x) }}{{ top }}]{% endmacro %}"
                                  + "{% macro b(y, z=True) %}{{ y }}{{ z }}{% endmacro %}{{ a(1) }}"), "[1TrueT]")
        XCTAssertEqual(try render("{% for k, v in {'b': 1, 'A': 2, 'c': 3} | dictsort %}{{ k }}{{ v }}{% endfor %}"
                                  + "{{ ['a','b'] | map('upper') | join }}{{ '<a & \"b\">' | e }}"), "A2b1c3AB&lt;a &amp; &#34;b&#34;&gt;")
        XCTAssertEqual(try render("{% for k, v in {'p': 1, 'q': 2}.items() %}{{ k }}={{ v }};{% endfor %}"), "p=1;q=2;")
    }

    func testFiltersMethodsTestsOperators() throws {
        XCTAssertEqual(try render("{{ '  Hi There  ' | trim | lower }}|{{ 'ab' | upper }}|{{ [3,1,2] | length }}|{{ 'a-b-c' | replace('-', '+') }}"
                                  + "|{{ undefined_thing | default('dflt') }}|{{ [1,2,3] | first }}{{ [1,2,3] | last }}|{{ ['x','y'] | join(', ') }}"
                                  + "|{{ [{'a': 1}, {'a': 2}] | map(attribute='a') | list }}|{{ [{'t': 'i'}, {'t': 'x'}] | selectattr('t', 'equalto', 'x') | list }}"
                                  + "|{{ {'k': 'v', 'n': [1, none, true]} | tojson }}|{{ 'hello world' | capitalize }}|{{ 'hello world' | title }}"),
                       "hi there|AB|3|a+b+c|dflt|13|x, y|[1, 2]|[{'t': 'x'}]|{\"k\": \"v\", \"n\": [1, null, true]}|Hello world|Hello World")
        XCTAssertEqual(try render("{{ ' a b '.strip() }}|{{ 'x,y,z'.split(',') }}|{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith('bc') }}"
                                  + "|{{ 'a b  c'.split() }}|{{ 'abc'[1:] }}{{ 'abc'[::-1] }}{{ [1,2,3][-1] }}|{{ {'a': 1}.get('b', 'no') }}"),
                       "a b|['x', 'y', 'z']|TrueTrue|['a', 'b', 'c']|bccba3|no")
        XCTAssertEqual(try render("{{ x is defined }}{{ none is none }}{{ 'a' is string }}{{ {} is mapping }}{{ [1] is iterable }}"
                                  + "{{ 3 is odd }}{{ 4 is even }}{{ 1 is number }}{{ 'ab' is not string }}"),
                       "FalseTrueTrueTrueTrueTrueTrueTrueFalse")
        XCTAssertEqual(try render("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 / 2 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 'a' ~ 1 ~ none }} {{ 'b' in 'abc' }}"
                                  + " {{ 2 in [1, 2] }} {{ 'k' not in {'k': 1} }} {{ not 1 == 2 }} {{ 1 if 0 else 2 }} {{ 0 or 'x' }} {{ 1 and 0 }}"),
                       "7 9 3.5 3 1 a1None True True False True 2 x 0")
        // Filters bind tighter than `+`: Llama 3's `'…' + message['content'] | trim + '…'`.
        XCTAssertEqual(try render("{{ '[' + ' x ' | trim + ']' }}"), "[x]")
        XCTAssertEqual(try render("{{ {'s': 'é\"\\n'} | tojson(indent=2) }}"), "{\n  \"s\": \"é\\\"\\n\"\n}")
        XCTAssertEqual(try render("{{ [1, [2, 'x']] | tojson(indent=2) }}|{{ {} | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}"),
                       "[\n  1,\n  [\n    2,\n    \"x\"\n  ]\n]|{}|{\"a\": 2, \"b\": 1}")
        // Undefined values: empty when printed, filtered or tested, an error only when looked into.
        XCTAssertEqual(try render("{{ 'a' in x }}{{ x | length }}{{ x == none }}[{{ x | trim }}{{ x | upper }}{{ x ~ 'a' }}{{ x | join(',') }}]"
                                  + "{{ x | list }}{{ none.foo is defined }}{{ [1,2][5] is defined }}"), "False0False[a][]FalseFalse")
        XCTAssertEqual(try render("{{ 3.0 }} {{ 1e-5 }} {{ 0.1 + 0.2 }} {{ 2 ** -1 }} {{ 10 / 5 }} {{ true + 1 }} {{ 'é' | length }}{{ 'aé'[1] }}{{ 'aé'[::-1] }}"),
                       "3.0 1e-05 0.30000000000000004 0.5 2.0 2 1ééa")
    }

    func testVariablesAsTransformersPassesThem() throws {
        let t = try ChatTemplate(jinja: "{{ bos_token }}{{ tools is none }}{{ documents is defined }}{% for m in messages %}"
                                 + "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
                                 + "{{ '<img>' if p.type == 'image' else p.text }}{% endfor %}{% endif %}{% endfor %}"
                                 + "{{ '>' if add_generation_prompt }}", file: "t.jinja", specialTokens: ["bos_token": .string("<s>")])
        XCTAssertEqual(try t.render([.system("S"), .user(parts: "a <image> b", images: 1)], addGenerationPrompt: true), "<s>TrueTrueSa <img> b>")
        XCTAssertEqual(try t.render([.user(parts: "q", images: 1)], addGenerationPrompt: false), "<s>TrueTrue<img>q")
        XCTAssertEqual(try t.render([.user(parts: "<image>", images: 1)], addGenerationPrompt: false), "<s>TrueTrue<img>")
    }

    func testErrorsNameConstructFileAndPosition() throws {
        func message(_ source: String, _ context: [String: JinjaValue] = [:]) -> String {
            do {
                _ = try render(source, context)
                return "no error"
            } catch { return "\(error)" }
        }
        XCTAssertEqual(message("ok\n  {% include 'x.jinja' %}"), "t.jinja:2:3: unsupported tag 'include'")
        XCTAssertEqual(message("{{ x | frobnicate }}"), "t.jinja:1:8: unsupported filter 'frobnicate'")
        XCTAssertEqual(message("{% if x is prime %}{% endif %}"), "t.jinja:1:12: unsupported test 'prime'")
        XCTAssertEqual(message("{% for x in y %}"), "t.jinja:1:1: 'for' is not closed (no {% endfor %})")
        XCTAssertEqual(message("{{ missing.attr }}"), "t.jinja:1:11: 'missing' is undefined")
        XCTAssertEqual(message("{{ 'a' + 1 }}"), "t.jinja:1:8: unsupported operand types for +: a string and an integer")
        XCTAssertEqual(message("{% set x.y = 1 %}"), "t.jinja:1:1: cannot assign attribute 'y' on 'x': it is not a namespace()")
        XCTAssertEqual(message("{{ 'abc'.zfill(5) }}"), "t.jinja:1:15: undefined 'zfill' is not callable")
        let t = try ChatTemplate(jinja: "{{ raise_exception('roles must alternate') }}", file: "r.jinja")
        XCTAssertThrowsError(try t.render([.user("x")], addGenerationPrompt: true)) {
            XCTAssertEqual("\($0)", "r.jinja: the chat template rejected the conversation: roles must alternate")
        }
    }

    // MARK: - discovery

    func withDir(_ files: [String: String], _ body: (URL) throws -> Void) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tpl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        for (name, text) in files { try Data(text.utf8).write(to: dir.appendingPathComponent(name)) }
        try body(dir)
    }

    func rendered(_ dir: URL) throws -> String? {
        try ChatTemplate.find(in: dir)?.render([.user("u")], addGenerationPrompt: false)
    }

    func testFindsTemplatesWhereTransformersDoes() throws {
        let config = #"{"bos_token": {"content": "<s>", "special": true}, "eos_token": "</s>", "unk_token": null, "chat_template": "T{{ bos_token }}{{ eos_token }}{{ unk_token is defined }}"}"#
        try withDir(["tokenizer_config.json": config]) { XCTAssertEqual(try rendered($0), "T<s></s>False") }
        try withDir(["tokenizer_config.json": config, "processor_config.json": #"{"chat_template": "P{{ bos_token }}"}"#]) {
            XCTAssertEqual(try rendered($0), "P<s>")
        }
        try withDir(["tokenizer_config.json": config, "chat_template.json": #"{"chat_template": "J"}"#, "processor_config.json": #"{"chat_template": "P"}"#]) {
            XCTAssertEqual(try rendered($0), "J")
        }
        try withDir(["tokenizer_config.json": config, "chat_template.json": #"{"chat_template": "J"}"#, "chat_template.jinja": "F{{ eos_token }}\n"]) {
            XCTAssertEqual(try rendered($0), "F</s>")
        }
        let named = #"{"chat_template": [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D"}]}"#
        try withDir(["tokenizer_config.json": named]) { XCTAssertEqual(try rendered($0), "D") }
        try withDir(["tokenizer_config.json": #"{"chat_template": [{"name": "rag", "template": "X"}]}"#]) { dir in
            XCTAssertThrowsError(try ChatTemplate.find(in: dir)) { XCTAssertTrue("\($0)".contains("none named default"), "\($0)") }
        }
        try withDir(["tokenizer_config.json": #"{"eos_token": "</s>"}"#]) { XCTAssertNil(try ChatTemplate.find(in: $0)) }
        try withDir(["chat_template.jinja": "{% if %}"]) { dir in
            XCTAssertThrowsError(try ChatTemplate.find(in: dir)) {
                XCTAssertEqual("\($0)", "\(dir.appendingPathComponent("chat_template.jinja").path):1:7: unexpected '%}' in an expression")
            }
        }
    }

    func testBuiltinFallbackKeepsChatML() throws {
        let messages = [ChatMessage.user("Hi", images: 1)]
        XCTAssertEqual(try ChatTemplate.chatML.render(messages, addGenerationPrompt: false), "<|im_start|>user\n<image>Hi<|im_end|>\n")
        let custom = ChatTemplate.builtin("test", system: "S", image: "[img]")
        XCTAssertEqual(try custom.render(messages, addGenerationPrompt: true),
                       "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n[img]Hi<|im_end|>\n<|im_start|>assistant\n")
        XCTAssertEqual(try custom.render([.system("T")] + messages, addGenerationPrompt: false),
                       "<|im_start|>system\nT<|im_end|>\n<|im_start|>user\n[img]Hi<|im_end|>\n")
    }
}
