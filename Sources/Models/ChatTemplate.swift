import Foundation

public struct ChatMessage: Sendable, Equatable {
    public var role: String
    public var content: String
    /// Images attached to the message; rendered as placeholders before `content`, the way
    /// HF templates render `[{"type": "image"}, ..., {"type": "text"}]` content lists.
    public var images: Int

    public init(role: String, content: String, images: Int = 0) {
        self.role = role
        self.content = content
        self.images = images
    }

    public static func system(_ content: String) -> ChatMessage { ChatMessage(role: "system", content: content) }
    public static func user(_ content: String, images: Int = 0) -> ChatMessage {
        ChatMessage(role: "user", content: content, images: images)
    }
    public static func assistant(_ content: String) -> ChatMessage { ChatMessage(role: "assistant", content: content) }
}

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), as SmolLM2's and Qwen2(-VL)'s Jinja templates render it.
public struct ChatTemplate: Sendable {
    /// Inserted as a system turn when the conversation does not start with one; nil for none.
    public var defaultSystemPrompt: String?
    /// Text standing for one image; the caller splices the vision tokens/embeddings in its place.
    public var imagePlaceholder: String

    public init(defaultSystemPrompt: String? = nil, imagePlaceholder: String = "<image>") {
        self.defaultSystemPrompt = defaultSystemPrompt
        self.imagePlaceholder = imagePlaceholder
    }

    public static let chatML = ChatTemplate()
    public static let smolLM2 = ChatTemplate(
        defaultSystemPrompt: "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    public static let qwen2 = ChatTemplate(defaultSystemPrompt: "You are a helpful assistant.")
    public static let qwen2VL = ChatTemplate(
        defaultSystemPrompt: "You are a helpful assistant.",
        imagePlaceholder: "<|vision_start|><|image_pad|><|vision_end|>")

    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool) -> String {
        var out = ""
        if let system = defaultSystemPrompt, let first = messages.first, first.role != "system" {
            out += turn("system", system)
        }
        for m in messages {
            out += turn(m.role, String(repeating: imagePlaceholder, count: m.images) + m.content)
        }
        if addGenerationPrompt { out += "<|im_start|>assistant\n" }
        return out
    }

    private func turn(_ role: String, _ content: String) -> String {
        "<|im_start|>\(role)\n\(content)<|im_end|>\n"
    }
}
