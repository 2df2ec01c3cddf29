import Foundation
import Models

/// One test or training item: an image, a prompt with the "<image>" placeholder, and (when
/// labelled) the answer letter.
public struct Item: Sendable {
    public var id: String
    public var prompt: String
    /// nil for a text-only prompt.
    public var image: ImageSource?
    public var answer: String?
    /// Option texts A, B, C… when the item is multiple choice.
    public var options: [String]?
    /// The label as text (class name / VQA answer), for reports.
    public var label: String?

    public var answerMode: AnswerMode { options.map { .strict(options: $0) } ?? .open }
}

public enum ImageSource: Sendable {
    case file(URL)
    case memory(Image)
    /// A file shifted when it is loaded (a corrupted copy of a file-based test set), so a dataset
    /// of thousands of images opens without decoding them.
    case shiftedFile(URL, Shift, severity: Int, seed: UInt64)

    public func load() throws -> Image {
        switch self {
        case .file(let url): return try Image.load(url)
        case .memory(let img): return img
        case let .shiftedFile(url, shift, severity, seed):
            return applyShift(shift, severity: severity, to: try Image.load(url), seed: seed)
        }
    }
}

public struct DatasetError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// A named list of items. Specs:
/// - `fashion-mnist:train|test`, `fashion-mnist-c:<shift>:<severity>` (the test split shifted)
/// - `easy-vqa:train|test`, `easy-vqa-c:<shift>:<severity>` (the test split shifted)
/// - a path to a verl-style `.json` / `.jsonl` file
/// - several of these joined by commas: their items interleaved in turn (a training mixture whose
///   first items, e.g. an eval limit, sample every part)
public struct Dataset: Sendable {
    public var name: String
    public var items: [Item]

    public static let fashionClasses = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    public static func open(_ spec: String, seed: UInt64 = 0, root: URL = Paths.repoRoot) throws -> Dataset {
        let specs = spec.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard specs.count > 1 else { return try openOne(spec, seed: seed, root: root) }
        return interleaved(try specs.map { try openOne($0, seed: seed, root: root) })
    }

    /// Items taken in turn from each part (a part that runs out drops out); ids keep their part's
    /// name so that items of two parts never share one.
    static func interleaved(_ parts: [Dataset]) -> Dataset {
        var items: [Item] = []
        items.reserveCapacity(parts.reduce(0) { $0 + $1.items.count })
        for i in 0..<(parts.map(\.items.count).max() ?? 0) {
            for part in parts where i < part.items.count {
                var item = part.items[i]
                item.id = "\(part.name)/\(item.id)"
                items.append(item)
            }
        }
        return Dataset(name: parts.map(\.name).joined(separator: ","), items: items)
    }

    static func openOne(_ spec: String, seed: UInt64, root: URL) throws -> Dataset {
        let parts = spec.split(separator: ":").map(String.init)
        switch parts.first {
        case "fashion-mnist":
            guard parts.count == 2, ["train", "test"].contains(parts[1]) else {
                throw DatasetError(message: "\(spec): expected fashion-mnist:train or fashion-mnist:test")
            }
            return try fashionMNIST(split: parts[1], shift: nil, seed: seed)
        case "fashion-mnist-c":
            guard parts.count == 3, let sev = Int(parts[2]), (1...5).contains(sev), let shift = Shift(rawValue: parts[1]) else {
                throw DatasetError(message: "\(spec): expected fashion-mnist-c:<shift>:<1-5>, shifts: \(Shift.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return try fashionMNIST(split: "test", shift: (shift, sev), seed: seed)
        case "easy-vqa-c":
            guard parts.count == 3, let sev = Int(parts[2]), (1...5).contains(sev), let shift = Shift(rawValue: parts[1]) else {
                throw DatasetError(message: "\(spec): expected easy-vqa-c:<shift>:<1-5>, shifts: \(Shift.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return try easyVQA(split: "test", root: root, seed: seed, shift: (shift, sev))
        case "easy-vqa":
            guard parts.count == 2, ["train", "test"].contains(parts[1]) else {
                throw DatasetError(message: "\(spec): expected easy-vqa:train or easy-vqa:test")
            }
            return try easyVQA(split: parts[1], root: root, seed: seed)
        default:
            let url = URL(fileURLWithPath: spec)
            guard FileManager.default.fileExists(atPath: url.path) else {
                throw DatasetError(message: "\(spec): not a built-in dataset (fashion-mnist:…, fashion-mnist-c:…, easy-vqa:…, easy-vqa-c:…) and no such file")
            }
            let items = try DatasetFile.load(url).map { r in
                Item(id: r.id, prompt: r.prompt, image: r.imagePath.map { .file($0) },
                     answer: r.answer, options: r.options, label: r.answer)
            }
            return Dataset(name: url.lastPathComponent, items: items)
        }
    }

    static func fashionMNIST(split: String, shift: (Shift, Int)?, seed: UInt64) throws -> Dataset {
        let dir = URL(fileURLWithPath: "/usr/share/datasets/fashion-mnist")
        let prefix = split == "train" ? "train" : "t10k"
        let imagesURL = dir.appendingPathComponent("\(prefix)-images-idx3-ubyte.gz")
        guard FileManager.default.fileExists(atPath: imagesURL.path) else {
            throw DatasetError(message: "\(imagesURL.path) missing: run `make setup` (Debian package dataset-fashion-mnist)")
        }
        let (shape, pixels) = try IDXFile.read(imagesURL)
        let (_, labels) = try IDXFile.read(dir.appendingPathComponent("\(prefix)-labels-idx1-ubyte.gz"))
        let (h, w) = (shape[1], shape[2])
        var items: [Item] = []
        items.reserveCapacity(shape[0])
        for i in 0..<shape[0] {
            var img = Image(width: w, height: h, channels: 1, pixels: Array(pixels[(i * h * w)..<((i + 1) * h * w)]))
            if let (s, sev) = shift { img = applyShift(s, severity: sev, to: img, seed: imageSeed(seed, i)) }
            let id = "\(split)-\(i)"
            let mc = buildMultipleChoice(classNames: fashionClasses, correct: Int(labels[i]), itemSeed: multipleChoiceSeed(datasetSeed: seed, itemID: id))
            items.append(Item(id: id, prompt: mc.prompt, image: .memory(img), answer: mc.answerLetter, options: mc.options,
                              label: fashionClasses[Int(labels[i])]))
        }
        let name = shift.map { "fashion-mnist-c:\($0.0.rawValue):\($0.1)" } ?? "fashion-mnist:\(split)"
        return Dataset(name: name, items: items)
    }

    /// easy-VQA posed as multiple choice over answers of the same type (as the reference poses
    /// VQA): yes/no questions get two options, shape questions three, colour questions four.
    /// Each image's own noise draw for a shift, reproducible from the dataset's seed and the image's number.
    static func imageSeed(_ seed: UInt64, _ image: Int) -> UInt64 {
        seed &+ UInt64(bitPattern: Int64(image)) &* 0x9E37_79B9_7F4A_7C15
    }

    /// With a shift, every question about one image sees the same shifted copy of it (its noise drawn
    /// from the seed and the image id), as Fashion-MNIST-C shifts each test image once.
    static func easyVQA(split: String, root: URL, seed: UInt64, shift: (Shift, Int)? = nil) throws -> Dataset {
        let dir = root.appendingPathComponent(".deps/pkgs/easy-vqa/easy_vqa/data/\(split)")
        let qURL = dir.appendingPathComponent("questions.json")
        guard let data = try? Data(contentsOf: qURL) else {
            throw DatasetError(message: "\(qURL.path) missing: run `make setup` (PyPI easy-vqa)")
        }
        guard let rows = try JSONSerialization.jsonObject(with: data) as? [[Any]] else {
            throw DatasetError(message: "\(qURL.path): expected a list of [question, answer, image_id]")
        }
        let groups: [[String]] = [["yes", "no"], ["circle", "rectangle", "triangle"],
                                  ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black"]]
        var items: [Item] = []
        for (i, row) in rows.enumerated() {
            guard row.count == 3, let q = row[0] as? String, let a = row[1] as? String, let imgID = row[2] as? Int,
                  let group = groups.first(where: { $0.contains(a) }) else {
                throw DatasetError(message: "\(qURL.path): row \(i) is not [question, answer, image_id] with a known answer")
            }
            var rng = SplitMix64(seed: multipleChoiceSeed(datasetSeed: seed, itemID: "vqa-\(split)-\(i)"))
            var others = group.filter { $0 != a }
            others.shuffle(using: &rng)
            var options = Array(others.prefix(3))
            let pos = rng.below(options.count + 1)
            options.insert(a, at: pos)
            let letters = ["A", "B", "C", "D"]
            let prompt = "<image> \n \(q.prefix(1).uppercased() + q.dropFirst()) Choose the correct answer from the options below and respond with only the corresponding option letter. \n Options:\n"
                + zip(letters, options).map { "\($0). \($1)" }.joined(separator: "\n")
            let file = dir.appendingPathComponent("images/\(imgID).png")
            let image: ImageSource = shift.map {
                .shiftedFile(file, $0.0, severity: $0.1, seed: imageSeed(seed, imgID))
            } ?? .file(file)
            items.append(Item(id: "\(split)-\(i)", prompt: prompt, image: image, answer: letters[pos], options: options, label: a))
        }
        let name = shift.map { "easy-vqa-c:\($0.0.rawValue):\($0.1)" } ?? "easy-vqa:\(split)"
        return Dataset(name: name, items: items)
    }
}
