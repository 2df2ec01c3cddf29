import Foundation

/// One row of an adaptation / evaluation set.
public struct DatasetItem: Sendable, Equatable {
    public var id: String
    /// The user prompt, "<image>" placeholder included.
    public var prompt: String
    public var imagePath: URL?
    /// Ground truth, for metrics only; TTRV never trains on it.
    public var answer: String?
    /// The options listed in the prompt, in letter order; nil when the prompt lists none.
    public var options: [String]?

    public init(id: String, prompt: String, imagePath: URL?, answer: String?, options: [String]?) {
        self.id = id
        self.prompt = prompt
        self.imagePath = imagePath
        self.answer = answer
        self.options = options
    }
}

/// A problem with a dataset file, naming the file, the row and what is wrong.
public struct DatasetFileError: Error, CustomStringConvertible, Equatable {
    public var file: String
    /// "line 3" (JSONL, or a JSON syntax error) or "row 3" (JSON list, 1-based); nil for the
    /// whole file.
    public var location: String?
    public var message: String

    public var description: String {
        [file, location, message].compactMap { $0 }.joined(separator: ": ")
    }
}

/// verl-style dataset files: a JSON list of row objects, or JSONL (one object per line,
/// blank lines skipped).
///
/// Row keys: `prompt` (required; a string, or a chat list whose last "user" message's string
/// `content` is used), `image_path` (string) or `images` (a list of one string or of one
/// object with a string `path` / `image`), `answer` (string or number), `id` (string or
/// number; the 0-based row index when absent). Other keys are ignored. Relative image paths
/// resolve against the file's folder.
public enum DatasetFile {
    public static func load(_ url: URL) throws -> [DatasetItem] {
        let file = url.path
        func fail(_ location: String?, _ message: String) -> DatasetFileError {
            DatasetFileError(file: file, location: location, message: message)
        }
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw fail(nil, "cannot read file (\(error.localizedDescription))")
        }
        return try load(data: data, url: url)
    }

    /// Parses dataset bytes; `url` names the file in errors and anchors relative image paths.
    public static func load(data: Data, url: URL) throws -> [DatasetItem] {
        let file = url.path
        func fail(_ location: String?, _ message: String) -> DatasetFileError {
            DatasetFileError(file: file, location: location, message: message)
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw fail(nil, "not UTF-8 text")
        }
        let folder = url.deletingLastPathComponent()

        var rows: [(location: String, value: Any)] = []
        if text.first(where: { !$0.isWhitespace }) == "[" {
            let list: Any
            do {
                list = try JSONSerialization.jsonObject(with: data)
            } catch {
                throw fail(syntaxErrorLine(error, in: text), invalidJSON(error))
            }
            guard let array = list as? [Any] else { throw fail(nil, "expected a JSON list of rows") }
            rows = array.enumerated().map { ("row \($0.offset + 1)", $0.element) }
        } else {
            // Split on "\n" scalars, not Characters: a "\r\n" grapheme is not equal to "\n".
            let lines = text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false)
            for (i, line) in lines.enumerated() {
                let s = String(String.UnicodeScalarView(line))
                guard !s.allSatisfy(\.isWhitespace) else { continue }
                do {
                    rows.append(("line \(i + 1)", try JSONSerialization.jsonObject(with: Data(s.utf8))))
                } catch {
                    throw fail("line \(i + 1)", invalidJSON(error))
                }
            }
        }
        guard !rows.isEmpty else { throw fail(nil, "no rows") }

        return try rows.enumerated().map { index, row in
            do {
                return try item(row.value, index: index, folder: folder)
            } catch let message as RowError {
                throw fail(row.location, message.text)
            }
        }
    }

    private struct RowError: Error { var text: String }

    private static func item(_ value: Any, index: Int, folder: URL) throws -> DatasetItem {
        guard let row = value as? [String: Any] else { throw RowError(text: "expected a JSON object") }

        let prompt = try promptText(row["prompt"])
        let id = try scalarText(row["id"], key: "id") ?? String(index)
        let answer = try scalarText(row["answer"], key: "answer")

        var path: String?
        if let p = row["image_path"] {
            guard let s = p as? String, !s.isEmpty else {
                throw RowError(text: "\"image_path\" must be a non-empty string")
            }
            path = s
        } else if let images = row["images"] {
            path = try singleImage(images)
        }
        let imagePath = path.map { p in
            p.hasPrefix("/") ? URL(fileURLWithPath: p) : folder.appendingPathComponent(p)
        }
        let options = parseOptions(prompt)
        try checkOptions(prompt, options, answer: answer)
        return DatasetItem(
            id: id, prompt: prompt, imagePath: imagePath?.standardizedFileURL, answer: answer,
            options: options)
    }

    /// A prompt that announces options must list them, and a labelled row's answer must be one of
    /// them (its letter or its text); otherwise every reply would be scored against nothing.
    private static func checkOptions(_ prompt: String, _ options: [String]?, answer: String?) throws {
        guard let options else {
            if let header = optionsHeader(prompt) {
                throw RowError(text: "the prompt has an \"\(header)\" line but lists fewer than two options "
                    + "after it (expected lines such as \"A. cat\")")
            }
            return
        }
        guard let answer else { return }
        let letters = optionLetters(count: options.count)
        let trimmed = answer.trimmingCharacters(in: .whitespaces)
        guard letters.contains(trimmed.uppercased()) || options.contains(trimmed) else {
            throw RowError(text: "answer \"\(answer)\" is neither an option letter "
                + "(\(letters.first ?? "A")–\(letters.last ?? "A")) nor the text of an option")
        }
    }

    private static func promptText(_ value: Any?) throws -> String {
        guard let value, !(value is NSNull) else { throw RowError(text: "missing \"prompt\"") }
        if let s = value as? String { return s }
        if let messages = value as? [[String: Any]],
           let user = messages.last(where: { $0["role"] as? String == "user" }),
           let content = user["content"] as? String {
            return content
        }
        throw RowError(text: "\"prompt\" must be a string or a chat list with a user message")
    }

    /// Strings as they are, numbers as JSON writes them ("120", not "120.0").
    private static func scalarText(_ value: Any?, key: String) throws -> String? {
        guard let value, !(value is NSNull) else { return nil }
        if let s = value as? String { return s }
        // JSON booleans also bridge to NSNumber; they are no id or answer.
        if let n = value as? NSNumber, !(value is Bool) {
            let d = n.doubleValue
            if d == d.rounded(), abs(d) < 1e15 { return String(Int64(d)) }
            return "\(d)"
        }
        throw RowError(text: "\"\(key)\" must be a string or a number")
    }

    private static func singleImage(_ value: Any) throws -> String {
        guard let list = value as? [Any], list.count == 1 else {
            throw RowError(text: "\"images\" must be a list of exactly one image")
        }
        if let s = list[0] as? String, !s.isEmpty { return s }
        if let d = list[0] as? [String: Any],
           let s = (d["path"] as? String) ?? (d["image"] as? String), !s.isEmpty {
            return s
        }
        throw RowError(text: "\"images\" entry must be a path string or an object with \"path\"")
    }

    private static func invalidJSON(_ error: Error) -> String {
        guard let detail = (error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String else {
            return "invalid JSON"
        }
        return "invalid JSON (\(detail))"
    }

    /// The line of a JSON syntax error in a whole-file list. Foundation only says where in its
    /// debug description ("Invalid value around character 33."), a byte offset.
    private static func syntaxErrorLine(_ error: Error, in text: String) -> String? {
        guard let detail = (error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String,
              let range = detail.range(of: "around character ") else { return nil }
        guard let offset = Int(detail[range.upperBound...].prefix(while: \.isNumber)) else { return nil }
        let line = text.utf8.prefix(offset).reduce(1) { $1 == UInt8(ascii: "\n") ? $0 + 1 : $0 }
        return "line \(line)"
    }
}

/// The options a prompt lists: the lines after the last "Options:" or "Choices:" line, in
/// letter order from A, each "A. text", "(A) text", "A) text" or "A: text" (the forms of the
/// recognition prompt, MathVista and MathVerse). Stops at the first line that is not the next
/// letter; nil unless at least two options were found.
public func parseOptions(_ prompt: String) -> [String]? {
    let lines = prompt.components(separatedBy: "\n")
    guard let header = lines.lastIndex(where: { optionsHeader(line: $0) != nil }) else { return nil }

    var options: [String] = []
    for line in lines[(header + 1)...] {
        let s = line.trimmingCharacters(in: .whitespaces)
        let letter = String(UnicodeScalar(UInt8(65 + min(options.count, 25))))
        guard let rest = ["\(letter). ", "(\(letter)) ", "\(letter)) ", "\(letter): ", "\(letter):"]
            .first(where: s.hasPrefix).map({ s.dropFirst($0.count) })
        else { break }
        let text = rest.trimmingCharacters(in: .whitespaces)
        if text.isEmpty { break }
        options.append(text)
    }
    return options.count >= 2 ? options : nil
}

/// "Options:" or "Choices:" when some line of `prompt` ends with it.
func optionsHeader(_ prompt: String) -> String? {
    prompt.components(separatedBy: "\n").lazy.compactMap { optionsHeader(line: $0) }.first
}

private func optionsHeader(line: String) -> String? {
    let s = line.trimmingCharacters(in: .whitespaces)
    return ["Options:", "Choices:"].first { s.hasSuffix($0) }
}
