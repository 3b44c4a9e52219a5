"""Twenty varied JSON schemas, each with a request that asks for it: nested objects, arrays, enums, numbers with
bounds, required and optional fields, strings with patterns and formats, anyOf, $defs references, constants.

A number without a bound on its digits (no maximum, no multipleOf) lets a greedy small model write "1.0000..."
until max_tokens, as in any grammar engine: the schemas here give their numbers a precision, as real ones should."""
from __future__ import annotations

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}

CASES = [
    ("A person with a name and an age.", PERSON),
    ("Is the sky blue? Answer yes or no with a confidence.",
     {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                       "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                                                      "multipleOf": 0.01}},
      "required": ["answer", "confidence"], "additionalProperties": False}),
    ("List three fruits.", {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3,
                            "maxItems": 3}),
    ("A book with a title, an author and the year it was published.",
     {"type": "object", "properties": {"title": {"type": "string"}, "author": PERSON,
                                       "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
      "required": ["title", "author", "year"], "additionalProperties": False}),
    ("A US phone number.", {"type": "object", "properties": {
        "phone": {"type": "string", "pattern": "^\\([0-9]{3}\\) [0-9]{3}-[0-9]{4}$"}},
        "required": ["phone"], "additionalProperties": False}),
    ("The primary colours.", {"type": "array", "items": {"enum": ["red", "yellow", "blue", "green"]},
                              "minItems": 1, "maxItems": 4}),
    ("A point in 3D space.", {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.1},
        "y": {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.1},
        "z": {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.1}},
        "required": ["x", "y", "z"], "additionalProperties": False}),
    ("A shopping list with quantities.", {"type": "object", "properties": {"items": {
        "type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "item": {"type": "string", "maxLength": 30}, "quantity": {"type": "integer", "minimum": 1,
                                                                      "maximum": 12}},
            "required": ["item", "quantity"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False}),
    ("A date in ISO format.", {"type": "object", "properties": {"date": {"type": "string", "format": "date"}},
                               "required": ["date"], "additionalProperties": False}),
    ("Whether it will rain tomorrow.", {"type": "boolean"}),
    ("A city and its country code.", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "pattern": "^[A-Z]{2}$"}},
        "required": ["city", "country"], "additionalProperties": False}),
    ("A temperature reading.", {"type": "object", "properties": {
        "value": {"type": "number", "minimum": -90, "maximum": 60}, "unit": {"const": "celsius"}},
        "required": ["value", "unit"], "additionalProperties": False}),
    ("A pet: a dog with a breed, or a cat with a number of lives.", {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "dog"}, "breed": {"type": "string", "maxLength": 30}},
         "required": ["kind", "breed"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
         "required": ["kind", "lives"], "additionalProperties": False}]}),
    ("A team of two people.", {"type": "object", "$defs": {"member": PERSON}, "properties": {
        "team": {"type": "string", "maxLength": 30},
        "members": {"type": "array", "items": {"$ref": "#/$defs/member"}, "minItems": 2, "maxItems": 2}},
        "required": ["team", "members"], "additionalProperties": False}),
    ("An email address.", {"type": "object", "properties": {"email": {"type": "string", "format": "email"}},
                           "required": ["email"], "additionalProperties": False}),
    ("A product with a price and optional tags.", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "price": {"type": "number", "minimum": 0, "maximum": 10000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
        "required": ["name", "price"], "additionalProperties": False}),
    ("A chess move.", {"type": "string", "pattern": "^[a-h][1-8]-[a-h][1-8]$"}),
    ("A rating from 1 to 5 with a short comment.", {"type": "object", "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": {"type": "string", "maxLength": 60}},
        "required": ["stars", "comment"], "additionalProperties": False}),
    ("A matrix of two rows of two small numbers.", {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}),
    ("A traffic light state and how many seconds it lasts.", {"type": "object", "properties": {
        "light": {"enum": ["red", "amber", "green"]}, "seconds": {"type": "integer", "exclusiveMinimum": 0,
                                                                  "maximum": 120},
        "flashing": {"type": "boolean"}},
        "required": ["light", "seconds"], "additionalProperties": False}),
]
