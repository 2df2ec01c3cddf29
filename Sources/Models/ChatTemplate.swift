import Foundation

/// One piece of a message's content, in the user's order.
public enum ChatPart: Sendable, Equatable {
    case text(String)
    case image
}

public struct ChatMessage: Sendable, Equatable {
    public enum Content: Sendable, Equatable {
        /// `"content": "…"` (images, if any, are placeholders written in the text).
        case text(String)
        /// `"content": [{"type": "image"}, {"type": "text", "text": "…"}, …]`.
        case parts([ChatPart])
    }

    public var role: String
    public var content: Content

    public init(role: String, content: Content) {
        self.role = role
        self.content = content
    }

    /// `images` image parts before the text (a plain string when there are none).
    public init(role: String, content: String, images: Int = 0) {
        self.role = role
        self.content = images == 0 ? .text(content) : .parts(Array(repeating: .image, count: images) + [.text(content)])
    }

    public static func system(_ content: String) -> ChatMessage { ChatMessage(role: "system", content: content) }
    public static func user(_ content: String, images: Int = 0) -> ChatMessage {
        ChatMessage(role: "user", content: content, images: images)
    }
    public static func assistant(_ content: String) -> ChatMessage { ChatMessage(role: "assistant", content: content) }

    /// A user turn from ttrv's prompt convention: `placeholder` in `text` marks where an image goes;
    /// with `images` > 0 and no placeholder, the image parts come first (HF's usual order).
    public static func user(parts text: String, images: Int, placeholder: String = "<image>") -> ChatMessage {
        var parts: [ChatPart] = []
        let pieces = images > 0 ? text.components(separatedBy: placeholder) : [text]
        if images > 0, pieces.count == 1 { parts = Array(repeating: .image, count: images) }
        for (i, piece) in pieces.enumerated() {
            if i > 0 { parts.append(.image) }
            if !piece.isEmpty { parts.append(.text(piece)) }
        }
        return ChatMessage(role: "user", content: .parts(parts))
    }

    var jinjaValue: JinjaValue {
        let content: JinjaValue
        switch self.content {
        case .text(let s): content = .string(s)
        case .parts(let parts):
            content = .list(parts.map { part in
                switch part {
                case .image: return .dict(JinjaDict([("type", .string("image"))]))
                case .text(let t): return .dict(JinjaDict([("type", .string("text")), ("text", .string(t))]))
                }
            })
        }
        return .dict(JinjaDict([("role", .string(role)), ("content", content)]))
    }
}

/// A model whose prompts come from a chat template that can be replaced (`--chat-template`).
public protocol ChatTemplated: AnyObject {
    var chatTemplate: ChatTemplate { get set }
}

/// How a checkpoint turns a conversation into prompt text: its own Jinja chat template, found where
/// transformers looks for it, or — for a checkpoint without one — ttrv's built-in ChatML rules.
public struct ChatTemplate: Sendable {
    public enum Kind: Sendable {
        case jinja(JinjaTemplate)
        /// ChatML with an optional default system turn; images become `imagePlaceholder`.
        case builtin(name: String, defaultSystemPrompt: String?, imagePlaceholder: String)
    }

    public let kind: Kind
    /// bos_token, eos_token, … as the template sees them.
    public var specialTokens: [String: JinjaValue]
    /// The checkpoint a built-in template stands in for: its first use prints a one-line warning.
    public var fallbackFor: String?

    public init(kind: Kind, specialTokens: [String: JinjaValue] = [:]) {
        self.kind = kind
        self.specialTokens = specialTokens
    }

    /// A Jinja template from source text; `file` names it in errors.
    public init(jinja source: String, file: String, specialTokens: [String: JinjaValue] = [:]) throws {
        self.init(kind: .jinja(try JinjaTemplate(source: source, file: file)), specialTokens: specialTokens)
    }

    /// Where the prompt format comes from, for messages.
    public var origin: String {
        switch kind {
        case .jinja(let t): return t.file
        case .builtin(let name, _, _): return "ttrv's built-in \(name) rules"
        }
    }

    public var isBuiltin: Bool { if case .builtin = kind { return true } else { return false } }

    /// The Jinja source, when there is one (to copy the template along with a model).
    public var jinjaSource: String? { if case .jinja(let t) = kind { return t.source } else { return nil } }

    public static let chatML = builtin("ChatML", system: nil)
    public static let smolLM2 = builtin("SmolLM2 ChatML",
                                        system: "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    public static let qwen2 = builtin("Qwen2 ChatML", system: "You are a helpful assistant.")
    public static let qwen2VL = builtin("Qwen2-VL ChatML", system: "You are a helpful assistant.",
                                        image: "<|vision_start|><|image_pad|><|vision_end|>")

    public static func builtin(_ name: String, system: String?, image: String = "<image>") -> ChatTemplate {
        ChatTemplate(kind: .builtin(name: name, defaultSystemPrompt: system, imagePlaceholder: image))
    }

    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool) throws -> String {
        switch kind {
        case .jinja(let t):
            var context = specialTokens
            context["messages"] = .list(messages.map(\.jinjaValue))
            context["add_generation_prompt"] = .bool(addGenerationPrompt)
            context["tools"] = JinjaValue.none
            context["documents"] = JinjaValue.none
            do {
                return try t.render(context)
            } catch let e as JinjaRaised {
                throw ModelError("\(t.file): the chat template rejected the conversation: \(e.message)")
            }
        case .builtin(_, let system, let placeholder):
            if let source = fallbackFor { Self.warnOnce(source, origin) }
            return Self.renderChatML(messages, system: system, imagePlaceholder: placeholder,
                                     addGenerationPrompt: addGenerationPrompt)
        }
    }

    static func renderChatML(_ messages: [ChatMessage], system: String?, imagePlaceholder: String,
                             addGenerationPrompt: Bool) -> String {
        func turn(_ role: String, _ content: String) -> String { "<|im_start|>\(role)\n\(content)<|im_end|>\n" }
        var out = ""
        if let system, let first = messages.first, first.role != "system" { out += turn("system", system) }
        for m in messages {
            switch m.content {
            case .text(let s): out += turn(m.role, s)
            case .parts(let parts):
                out += turn(m.role, parts.map { if case .text(let t) = $0 { t } else { imagePlaceholder } }.joined())
            }
        }
        if addGenerationPrompt { out += "<|im_start|>assistant\n" }
        return out
    }

    // MARK: - Finding a checkpoint's template

    /// The template of an HF directory, looked up as transformers does: `chat_template.jinja`,
    /// `chat_template.json`, `processor_config.json`, then `tokenizer_config.json` (a string, or a list
    /// of named templates of which "default" is used). Nil when the directory has none.
    public static func find(in dir: URL) throws -> ChatTemplate? {
        let tokens = try specialTokens(in: dir)
        let jinja = dir.appendingPathComponent("chat_template.jinja")
        if FileManager.default.fileExists(atPath: jinja.path) { return try load(jinja, specialTokens: tokens) }
        for name in ["chat_template.json", "processor_config.json", "tokenizer_config.json"] {
            let url = dir.appendingPathComponent(name)
            guard FileManager.default.fileExists(atPath: url.path) else { continue }
            let file: TemplateFile
            do { file = try JSONDecoder().decode(TemplateFile.self, from: Data(contentsOf: url)) } catch {
                throw ModelError("\(url.path): cannot read (\(error))")
            }
            guard let field = file.chatTemplate else { continue }
            return try ChatTemplate(jinja: try field.defaultTemplate(url), file: url.path, specialTokens: tokens)
        }
        return nil
    }

    /// A template file given by the user: Jinja source, or a JSON file with a `chat_template` field.
    public static func load(_ url: URL, specialTokens: [String: JinjaValue] = [:]) throws -> ChatTemplate {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw ModelError("\(url.path): cannot read the chat template (\(error))")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw ModelError("\(url.path): not UTF-8 text") }
        if url.pathExtension == "json" {
            let file: TemplateFile
            do { file = try JSONDecoder().decode(TemplateFile.self, from: data) } catch {
                throw ModelError("\(url.path): cannot read (\(error))")
            }
            guard let field = file.chatTemplate else { throw ModelError("\(url.path): has no chat_template") }
            return try ChatTemplate(jinja: try field.defaultTemplate(url), file: url.path, specialTokens: specialTokens)
        }
        return try ChatTemplate(jinja: text, file: url.path, specialTokens: specialTokens)
    }

    /// bos_token, eos_token, … from `tokenizer_config.json` (then `special_tokens_map.json` for the rest).
    public static func specialTokens(in dir: URL) throws -> [String: JinjaValue] {
        var tokens: [String: JinjaValue] = [:]
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let url = dir.appendingPathComponent(name)
            guard FileManager.default.fileExists(atPath: url.path) else { continue }
            let file: SpecialTokensFile
            do { file = try JSONDecoder().decode(SpecialTokensFile.self, from: Data(contentsOf: url)) } catch {
                throw ModelError("\(url.path): cannot read the special tokens (\(error))")
            }
            for (key, value) in file.tokens where tokens[key] == nil { tokens[key] = value }
        }
        return tokens
    }

    /// Special tokens of a GGUF tokenizer, by the ids its metadata names.
    public static func specialTokens(gguf: GGUFFile) -> [String: JinjaValue] {
        let m = gguf.metadata
        guard let vocab = m["tokenizer.ggml.tokens"]?.strings else { return [:] }
        var tokens: [String: JinjaValue] = [:]
        for (key, field) in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                             ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")] {
            if let id = m["tokenizer.ggml.\(field)"]?.int, vocab.indices.contains(id) { tokens[key] = .string(vocab[id]) }
        }
        return tokens
    }

    /// `builtin` standing in for `source`, a checkpoint without a template of its own.
    public static func fallback(_ builtin: ChatTemplate, for source: String) -> ChatTemplate {
        var t = builtin
        t.fallbackFor = source
        return t
    }

    nonisolated(unsafe) private static var warned: Set<String> = []
    private static let warnLock = NSLock()

    static func warnOnce(_ source: String, _ origin: String) {
        warnLock.lock()
        let first = warned.insert(source).inserted
        warnLock.unlock()
        guard first else { return }
        FileHandle.standardError.write(Data(
            "warning: \(source) has no chat template; using \(origin) (set one with --chat-template FILE)\n".utf8))
    }
}

/// `chat_template` as HF files hold it: a string, or a list of `{"name", "template"}`.
struct TemplateFile: Decodable {
    enum Field: Decodable {
        case single(String)
        case named([Named])
        struct Named: Decodable { let name: String, template: String }

        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let s = try? c.decode(String.self) { self = .single(s) } else { self = .named(try c.decode([Named].self)) }
        }

        func defaultTemplate(_ url: URL) throws -> String {
            switch self {
            case .single(let s): return s
            case .named(let list):
                guard let d = list.first(where: { $0.name == "default" }) else {
                    let names = list.map(\.name).joined(separator: ", ")
                    throw ModelError("\(url.path): several chat templates (\(names)) and none named default")
                }
                return d.template
            }
        }
    }
    let chatTemplate: Field?
    enum CodingKeys: String, CodingKey { case chatTemplate = "chat_template" }
}

/// The special-token fields of tokenizer_config.json / special_tokens_map.json: each a string or an
/// AddedToken object with `content`.
struct SpecialTokensFile: Decodable {
    struct Token: Decodable {
        let content: String
        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let s = try? c.decode(String.self) { content = s; return }
            struct Object: Decodable { let content: String }
            content = try c.decode(Object.self).content
        }
    }
    enum CodingKeys: String, CodingKey {
        case bos = "bos_token", eos = "eos_token", unk = "unk_token", pad = "pad_token", sep = "sep_token"
        case cls = "cls_token", mask = "mask_token", additional = "additional_special_tokens"
    }
    var tokens: [String: JinjaValue] = [:]

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        for key in [CodingKeys.bos, .eos, .unk, .pad, .sep, .cls, .mask] {
            // A null token is absent, as in transformers' special_tokens_map.
            if let t = try c.decodeIfPresent(Token.self, forKey: key) { tokens[key.rawValue] = .string(t.content) }
        }
        if let list = try c.decodeIfPresent([Token].self, forKey: .additional) {
            tokens[CodingKeys.additional.rawValue] = .list(list.map { .string($0.content) })
        }
    }
}
