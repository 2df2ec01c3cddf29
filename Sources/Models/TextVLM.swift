import Foundation
import Torch

/// A plain language model behind the VLM interface, for text-only prompts (and for
/// measuring the adaptation loop on the decoder alone).
public final class TextOnlyVLM: VisionLanguageModel, ChatTemplated {
    public let language: LanguageModel
    public let module: Module
    public var chatTemplate: ChatTemplate
    public var lm: CausalLM { language.model }
    public var tokenizer: Tokenizer { language.tokenizer }
    public var stopIds: Set<Int> { language.stopIds }
    public var parts: ModelParts { ModelParts(vision: [], projector: [], language: language.model) }
    public var defaultTrainedParts: [ModelPart] { [.lm] }

    public init(_ language: LanguageModel) {
        self.language = language
        chatTemplate = language.template
        module = Module()
        module.register("language_model", language.model)
    }

    public func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt {
        guard image == nil else { throw ModelError("\(language.source.path) is a text-only model; it cannot take an image") }
        var messages: [ChatMessage] = []
        if let system { messages.append(.system(system)) }
        messages.append(.user(text))
        let ids = tokenizer.encode(try chatTemplate.render(messages, addGenerationPrompt: true))
        return PreparedPrompt(embeddings: try lm.embed(Tensor(ids.map { Int64($0) }, shape: [1, ids.count])),
                              positions: try Tensor.arange(ids.count).unsqueeze(0), nextPosition: ids.count, tokenIds: ids)
    }
}
